"""What the adapters take from lpreg's core: their lpreg_* options as one `lpreg.LossConfig`."""

import dataclasses
from typing import Any, Mapping

from .. import LossConfig

__all__ = ["loss_config"]

LOSS_FIELDS = tuple(f.name for f in dataclasses.fields(LossConfig))
# the loss options an adapter exposes as lpreg_<name>; the clips and aggregation are the framework's own
ADAPTER_FIELDS = ("compat", "mode", "threshold", "rho", "beta", "kl_estimator")


def loss_config(options: Mapping[str, Any]) -> LossConfig:
    """The adapter's lpreg_* options -> a validated LossConfig; an error names the lpreg_ option."""
    try:
        return LossConfig(**{f: options[f"lpreg_{f}"] for f in ADAPTER_FIELDS})
    except ValueError as exc:
        msg = str(exc)  # LossConfig's messages start with the field's name: "rho must be ..."
        if any(msg.startswith(name + " ") for name in LOSS_FIELDS):
            raise ValueError(f"lpreg_{msg}") from None
        raise ValueError(f"invalid lpreg_* setting: {msg}") from None
