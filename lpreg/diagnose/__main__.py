"""`python -m lpreg.diagnose`: the `lpreg-diagnose` command (lpreg.diagnose.cli)."""

import sys

from lpreg.diagnose.cli import main

sys.exit(main())
