"""What the adapters take from lpreg's core: the loss configuration and its error messages."""

import dataclasses

from .. import LossConfig, needs_step_selection

__all__ = ["LossConfig", "needs_step_selection", "lpreg_error", "LOSS_FIELDS"]

LOSS_FIELDS = tuple(f.name for f in dataclasses.fields(LossConfig))


def lpreg_error(exc: ValueError) -> ValueError:
    """LossConfig's ValueError, renamed to the adapter's option: "rho must be ..." -> "lpreg_rho must be ..."."""
    msg = str(exc)
    for name in sorted(LOSS_FIELDS, key=len, reverse=True):
        if msg.startswith(name + " "):
            return ValueError(f"lpreg_{msg}")
    return ValueError(f"invalid lpreg_* setting: {msg}")
