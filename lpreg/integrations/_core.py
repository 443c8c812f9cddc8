"""What the adapters take from lpreg's core: their lpreg_* options as one `lpreg.LossConfig`."""

from typing import Any, Mapping

from .. import LossConfig
from ..loss_config import LossConfigError

__all__ = ["loss_config"]

# the loss options an adapter exposes as lpreg_<name>; the clips and aggregation are the framework's own
ADAPTER_FIELDS = ("compat", "mode", "threshold", "rho", "beta", "kl_estimator")


def loss_config(options: Mapping[str, Any]) -> LossConfig:
    """The adapter's lpreg_* options -> a validated LossConfig; an error names the lpreg_ option
    (a LossConfigError whose `field` is "lpreg_<field>", its message starting with that name)."""
    try:
        return LossConfig(**{f: options[f"lpreg_{f}"] for f in ADAPTER_FIELDS})
    except LossConfigError as exc:  # the field comes from the exception, not from its text
        raise LossConfigError(f"lpreg_{exc.field}", f"lpreg_{exc}") from None
