"""TEMPORARY: the core API of issue 18 until it lands on main (removed at rebase)."""

import math
from dataclasses import dataclass
from typing import Optional

from .. import _validate

COMPATS = ("paper", "released")


@dataclass(frozen=True)
class LossConfig:
    compat: str = "released"
    temperature: float = 1.0
    mode: str = "min_p"
    threshold: float = 0.02
    rho: float = 0.01
    beta: float = 1.0
    clip_low: float = 1.0
    clip_high: float = 9.0
    clip_ratio_c: Optional[float] = None
    loss_agg_mode: str = "token-mean"
    kl_estimator: Optional[str] = None
    ignore_index: int = -100
    backend: str = "auto"

    def __post_init__(self):
        if self.compat not in COMPATS:
            raise ValueError(f"compat must be one of {COMPATS}, got {self.compat!r}")
        _validate.check_mode_threshold(self.mode, self.threshold)
        if not (0 < float(self.rho) <= 1):
            raise ValueError(f"rho must be in (0, 1], got {self.rho!r}")
        if not (float(self.beta) >= 0) or math.isinf(float(self.beta)):
            raise ValueError(f"beta must be a finite number >= 0, got {self.beta!r}")
        if self.kl_estimator not in (None, "full", "k3"):
            raise ValueError(f"kl_estimator must be None, 'full' or 'k3', got {self.kl_estimator!r}")
        if self.clip_ratio_c is not None and not float(self.clip_ratio_c) > 1:
            raise ValueError(f"clip_ratio_c must be None or > 1, got {self.clip_ratio_c!r}")


def needs_step_selection(compat: str) -> bool:
    if compat not in COMPATS:
        raise ValueError(f"compat must be one of {COMPATS}, got {compat!r}")
    return compat == "paper"
