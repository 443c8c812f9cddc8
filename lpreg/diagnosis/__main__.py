"""`python -m lpreg.diagnosis`: the `lpreg-diagnose` command (lpreg.diagnosis.cli)."""

import sys

from lpreg.diagnosis.cli import main

sys.exit(main())
