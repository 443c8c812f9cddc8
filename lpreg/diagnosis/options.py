"""The settings of one diagnosis, validated once: every error names the field and the value.

The user's own Lp-Reg settings (`threshold` = kappa, `rho`, `compat`, `mode`, `beta`) and the shape of their
loss call (`tokens_per_call`), the sampling (`samples` = G per prompt at `temperature`) and the grid of
kappa x rho that the report sweeps. Light on purpose: `import lpreg` imports this module's package, so it
imports neither torch's heavy friends nor transformers.
"""

import math
from dataclasses import dataclass, field
from typing import Tuple

from lpreg import _backends
from lpreg.loss_config import LossConfig

MODES = ("min_p", "fixed")
COMPATS = ("released", "paper")
REWARDS = ("math-verify", "exact")
BACKENDS = _backends.names()  # the backend registry's names, "auto" first
DTYPES = ("auto", "float32", "bfloat16", "float16")
# the default grid: around the paper's kappa = 0.02 and rho = 1%, out to where selection always happens
DEFAULT_THRESHOLDS = (0.005, 0.01, 0.02, 0.05, 0.1)
DEFAULT_RHOS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    x = float(value)
    if math.isnan(x) or math.isinf(x):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return x


def _count(name: str, value: object, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    return int(value)


def check_threshold(mode: str, threshold: object, name: str = "threshold") -> float:
    """kappa: in (0, 1] for min_p (keep p_i >= kappa max p), in (0, 1) for fixed (keep p_i >= kappa)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    x = _number(f"{name} (kappa)", threshold)
    if mode == "min_p" and not 0 < x <= 1:
        raise ValueError(f"{name} (kappa) must be in (0, 1] for mode='min_p', got {threshold!r}")
    if mode == "fixed" and not 0 < x < 1:
        raise ValueError(f"{name} (kappa) must be in (0, 1) for mode='fixed', got {threshold!r}")
    return x


def check_rho(rho: object, name: str = "rho") -> float:
    x = _number(name, rho)
    if not 0 < x <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {rho!r}")
    return x


@dataclass(frozen=True)
class Settings:
    """What `lpreg.diagnose` measures at (defaults: the paper's recipe, 8 samples per prompt at T = 1).

    threshold (kappa), mode: the proxy's noise filter (docs/spec.md §1). rho, compat, beta: the selection
    and the penalty's weight (§3). tokens_per_call: response tokens per loss call (the user's micro-batch):
    the released form picks k = int(rho * n_neg) per call and nothing when k <= 1. thresholds, rhos: the grid.
    """

    # the Lp-Reg settings' defaults are the losses' own (LossConfig: the paper's recipe)
    threshold: float = LossConfig.threshold
    rho: float = LossConfig.rho
    compat: str = LossConfig.compat
    mode: str = LossConfig.mode
    beta: float = LossConfig.beta
    tokens_per_call: int = 4096
    samples: int = 8
    temperature: float = 1.0
    max_new_tokens: int = 256
    prompts: int = 32
    reward: str = "math-verify"
    thresholds: Tuple[float, ...] = DEFAULT_THRESHOLDS
    rhos: Tuple[float, ...] = DEFAULT_RHOS
    examples: int = 20
    seed: int = 0
    backend: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    grid: Tuple[Tuple[float, ...], Tuple[float, ...]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.compat not in COMPATS:
            raise ValueError(f"compat must be one of {COMPATS}, got {self.compat!r}")
        if self.reward not in REWARDS:
            raise ValueError(f"reward must be one of {REWARDS}, got {self.reward!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"device must be 'auto' or a torch device string ('cpu', 'cuda:0'), got {self.device!r}")
        threshold = check_threshold(self.mode, self.threshold)
        rho = check_rho(self.rho)
        beta = _number("beta", self.beta)
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta!r}")
        temperature = _number("temperature", self.temperature)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        for name, least in (("tokens_per_call", 1), ("samples", 2), ("max_new_tokens", 1), ("prompts", 1),
                            ("examples", 0), ("seed", 0)):
            _count(name, getattr(self, name), least)
        if not self.thresholds or not self.rhos:
            raise ValueError(f"thresholds and rhos must be non-empty, got {self.thresholds!r} and {self.rhos!r}")
        thresholds = tuple(check_threshold(self.mode, t, "thresholds") for t in self.thresholds)
        rhos = tuple(check_rho(r, "rhos") for r in self.rhos)
        # the grid always holds the user's own cell
        grid = (tuple(sorted(set(thresholds) | {threshold})), tuple(sorted(set(rhos) | {rho})))
        for name, value in (("threshold", threshold), ("rho", rho), ("beta", beta), ("temperature", temperature),
                            ("thresholds", thresholds), ("rhos", rhos), ("grid", grid)):
            object.__setattr__(self, name, value)
