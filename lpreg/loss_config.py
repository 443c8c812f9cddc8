"""The Lp-Reg loss options, defined once: `LossConfig`, and which forms select step-wide.

Every loss entry point (`lpreg_policy_loss`, `policy_loss_from_stats`, `fused_linear_policy_loss`)
takes these options as keywords, validates them once by building a `LossConfig`, and passes that
object down; nothing below the entry point checks them again. Adapters validate their own
`lpreg_*` settings the same way: `LossConfig(compat=..., rho=...)` raises ValueError naming the
argument and the value.
"""

import dataclasses
import inspect
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Optional

from . import _validate

COMPATS = ("paper", "released")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
KL_ESTIMATORS = ("full", "k3")

# options that describe how the statistics were computed: they do not apply to policy_loss_from_stats
STATS_OPTIONS = ("temperature", "mode", "threshold", "ignore_index", "backend")


@dataclass(frozen=True)
class LossConfig:
    """The hyper-parameters of the Lp-Reg policy loss (docs/spec.md §3).

    compat: "released" (the authors' code, the default) or "paper" (Eq. 6 as written).
    temperature, mode, threshold: the policy's temperature and the proxy's noise filter (docs/spec.md §1).
    rho: fraction of lowest-probability tokens eligible for the penalty; beta: its weight (0 turns
        Lp-Reg off entirely: no token is selected, and the loss is the plain clipped surrogate).
    clip_low, clip_high: the ratio clip [1 - clip_low, 1 + clip_high] ([0, 10] by default, the paper's).
    clip_ratio_c: None (the Lp-Reg objective), or > 1 for dual-clip PPO as verl applies it: an A < 0
        token's surrogate is capped at -A * clip_ratio_c.
    loss_agg_mode: "token-mean", "seq-mean-token-mean" or "seq-mean-token-sum".
    kl_estimator: None (k3 for released, the full KL for paper), "k3" or "full".
    ignore_index: labels equal to it never count; backend: the token-statistics backend.
    """

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

    def __post_init__(self) -> None:
        check_compat(self.compat)
        if self.loss_agg_mode not in LOSS_AGG_MODES:
            raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {self.loss_agg_mode!r}")
        kl_estimator = self.kl_estimator
        if kl_estimator is None:
            kl_estimator = "full" if self.compat == "paper" else "k3"
        if kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS} or None, got {self.kl_estimator!r}")
        _validate.check_backend(self.backend)
        rho, beta = _number("rho", self.rho), _number("beta", self.beta)
        clip_low, clip_high = _number("clip_low", self.clip_low), _number("clip_high", self.clip_high)
        if not (0 < rho <= 1):
            raise ValueError(f"rho must be in (0, 1], got {self.rho!r}")
        if not (beta >= 0) or math.isinf(beta):
            raise ValueError(f"beta must be a finite number >= 0, got {self.beta!r}")
        if not (0 <= clip_low <= 1):
            raise ValueError(f"clip_low must be in [0, 1], got {self.clip_low!r}")
        if not (clip_high >= 0):
            raise ValueError(f"clip_high must be >= 0, got {self.clip_high!r}")
        clip_c = self.clip_ratio_c
        if clip_c is not None:
            clip_c = _number("clip_ratio_c", clip_c)
            if not (clip_c > 1) or math.isinf(clip_c):
                raise ValueError(f"clip_ratio_c must be None or a finite number > 1, got {self.clip_ratio_c!r}")
        try:
            ignore_index = operator.index(self.ignore_index)
        except TypeError:
            raise ValueError(f"ignore_index must be an int, got {self.ignore_index!r}") from None
        normalised = dict(ignore_index=ignore_index,
            temperature=_validate.check_temperature(self.temperature),
            threshold=_validate.check_mode_threshold(self.mode, self.threshold),
            rho=rho, beta=beta, clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_c, kl_estimator=kl_estimator,
        )
        for name, value in normalised.items():  # frozen: the checked values, as plain floats
            object.__setattr__(self, name, value)

    @classmethod
    def from_options(cls, options: Dict[str, Any], *, excluded: Iterable[str] = ()) -> "LossConfig":
        """A LossConfig from an entry point's keyword options; `excluded` options do not apply there."""
        excluded = tuple(excluded)
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {unknown}; the loss options are "
                            f"{[f.name for f in dataclasses.fields(cls) if f.name not in excluded]}")
        given = sorted(set(options) & set(excluded))
        if given:
            raise ValueError(f"{given[0]}={options[given[0]]!r} does not apply here: the statistics were already "
                             f"computed with their temperature, filter and backend")
        return cls(**options)


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None


def check_compat(compat: str) -> str:
    if compat not in COMPATS:
        raise ValueError(f"compat must be one of {COMPATS}, got {compat!r}")
    return compat


def needs_step_selection(compat: str) -> bool:
    """Whether the form's lowest-rho set spans the whole step (every micro-batch and rank), so that a
    caller splitting a step must fix it up front with `lpreg.selection_threshold`: True for "paper"
    (Eq. 6's batch-wide percentile), False for "released" (the released code selects per call)."""
    return check_compat(compat) == "paper"


def loss_options(*, excluded: Iterable[str] = ()) -> Callable:
    """Give an entry point taking `**options` the signature of its LossConfig keywords (for help(),
    IDEs' runtime introspection and docs), so the keyword set is written once, in LossConfig."""
    excluded = tuple(excluded)

    def wrap(fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        own = [p for p in sig.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
        lead = [p for p in own if p.kind != inspect.Parameter.KEYWORD_ONLY]
        tail = [p for p in own if p.kind == inspect.Parameter.KEYWORD_ONLY]
        opts = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
                for f in dataclasses.fields(LossConfig) if f.name not in excluded]
        fn.__signature__ = sig.replace(parameters=lead + opts + tail)
        return fn

    return wrap
