"""The Lp-Reg loss options, defined once: `LossConfig`, and which forms select step-wide.

Every loss entry point (`lpreg_policy_loss`, `policy_loss_from_stats`, `fused_linear_policy_loss`,
`lpreg_regularize`) takes these options as explicit keywords (the same names and defaults; a test keeps
them equal; `lpreg_regularize` takes those of the selection and the penalty), validates them once by
building a `LossConfig`, and passes that object down; nothing below the entry point checks them again.
Adapters validate their own `lpreg_*` settings the same way: `LossConfig(compat=..., rho=...)` raises
`LossConfigError`, a ValueError whose `field` attribute is the offending field's name and whose message starts with it
(so an adapter maps it to its own option name without parsing the text).
"""

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar

from . import _validate

COMPATS = ("paper", "released")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
KL_ESTIMATORS = ("full", "k3")

# options that describe how the statistics were computed: they do not apply to policy_loss_from_stats
STATS_OPTIONS = ("temperature", "mode", "threshold", "ignore_index", "backend", "logit_scale", "logit_softcap")


class LossConfigError(ValueError):
    """A bad loss option: `field` is the LossConfig field's name, and the message starts with it
    ("rho must be in (0, 1], got 0.0")."""

    def __init__(self, field: str, message: str):
        if not message.startswith(field):
            message = f"{field}: {message}"
        super().__init__(message)
        self.field = field


T = TypeVar("T")


def _checked(field: str, fn: Callable[..., T], *args: Any) -> T:
    """fn(*args), its ValueError re-raised as a LossConfigError naming `field`."""
    try:
        return fn(*args)
    except LossConfigError:
        raise
    except ValueError as exc:
        raise LossConfigError(field, str(exc)) from None


@dataclass(frozen=True)
class LossConfig:
    """The options of the Lp-Reg policy loss (docs/spec.md §3), validated on construction.

    Every loss function takes these fields as keywords of the same names and defaults, and builds one
    LossConfig per call; adapters build one from their own settings.

    Attributes:
        compat: "released" (the authors' code, the default) or "paper" (Eq. 6 as written).
        temperature: The policy's sampling temperature T (> 0).
        mode: The proxy's noise filter, "min_p" or "fixed" (docs/spec.md §1).
        threshold: The filter's threshold (kappa).
        rho: The fraction of lowest-probability tokens eligible for the penalty, in (0, 1].
        beta: The penalty's weight, >= 0 (0 turns Lp-Reg off entirely: no token is selected, and the
            loss is the plain clipped surrogate).
        clip_low: The ratio clip's lower width: r >= 1 - clip_low ([0, 10] by default, the paper's).
        clip_high: The ratio clip's upper width: r <= 1 + clip_high.
        clip_ratio_c: None (the Lp-Reg objective), or > 1 for dual-clip PPO as verl applies it: an
            A < 0 token's surrogate is capped at -A * clip_ratio_c.
        loss_agg_mode: "token-mean", "seq-mean-token-mean" or "seq-mean-token-sum".
        kl_estimator: None (k3 for released, the full KL for paper), "k3" or "full".
        ignore_index: Labels equal to it never count.
        backend: The token-statistics backend: "auto", "triton", "torch", "cpu" or "cuda".
        logit_scale: The LM head's logit multiplier (Cohere, Granite, MiniCPM), applied to the raw
            logits x before the temperature; finite and > 0 (1.0: none).
        logit_softcap: None, or the LM head's tanh soft-cap c (Gemma): z = c tanh(logit_scale x / c).

    Raises:
        LossConfigError: A field is out of range; its `field` names it.
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
    logit_scale: float = 1.0
    logit_softcap: Optional[float] = None

    def __post_init__(self) -> None:
        _checked("compat", check_compat, self.compat)
        if self.loss_agg_mode not in LOSS_AGG_MODES:
            raise LossConfigError("loss_agg_mode", f"loss_agg_mode must be one of {LOSS_AGG_MODES}, "
                                                   f"got {self.loss_agg_mode!r}")
        kl_estimator = self.kl_estimator
        if kl_estimator is None:
            kl_estimator = "full" if self.compat == "paper" else "k3"
        if kl_estimator not in KL_ESTIMATORS:
            raise LossConfigError("kl_estimator", f"kl_estimator must be one of {KL_ESTIMATORS} or None, "
                                                  f"got {self.kl_estimator!r}")
        _checked("backend", _validate.check_backend, self.backend)
        rho, beta = _number("rho", self.rho), _number("beta", self.beta)
        clip_low, clip_high = _number("clip_low", self.clip_low), _number("clip_high", self.clip_high)
        if not (0 < rho <= 1):
            raise LossConfigError("rho", f"rho must be in (0, 1], got {self.rho!r}")
        if not (beta >= 0) or math.isinf(beta):
            raise LossConfigError("beta", f"beta must be a finite number >= 0, got {self.beta!r}")
        if not (0 <= clip_low <= 1):
            raise LossConfigError("clip_low", f"clip_low must be in [0, 1], got {self.clip_low!r}")
        if not (clip_high >= 0):
            raise LossConfigError("clip_high", f"clip_high must be >= 0, got {self.clip_high!r}")
        clip_c = self.clip_ratio_c
        if clip_c is not None:
            clip_c = _number("clip_ratio_c", clip_c)
            if not (clip_c > 1) or math.isinf(clip_c):
                raise LossConfigError("clip_ratio_c", f"clip_ratio_c must be None or a finite number > 1, "
                                                      f"got {self.clip_ratio_c!r}")
        logit_scale = _number("logit_scale", self.logit_scale)
        if not (logit_scale > 0) or math.isinf(logit_scale):
            raise LossConfigError("logit_scale", f"logit_scale must be a finite number > 0, got {self.logit_scale!r}")
        softcap = self.logit_softcap
        if softcap is not None:
            softcap = _number("logit_softcap", softcap)
            if not (softcap > 0) or math.isinf(softcap):
                raise LossConfigError("logit_softcap", f"logit_softcap must be None or a finite number > 0, "
                                                       f"got {self.logit_softcap!r}")
        try:
            ignore_index = operator.index(self.ignore_index)
        except TypeError:
            raise LossConfigError("ignore_index", f"ignore_index must be an int, got {self.ignore_index!r}") from None
        temperature = _checked("temperature", _validate.check_temperature, self.temperature)
        _checked("mode", _validate.check_mode_threshold, self.mode, 0.5)  # a legal threshold in both modes
        threshold = _checked("threshold", _validate.check_mode_threshold, self.mode, self.threshold)
        normalised = dict(ignore_index=ignore_index, temperature=temperature, threshold=threshold,
            rho=rho, beta=beta, clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_c, kl_estimator=kl_estimator,
            logit_scale=logit_scale, logit_softcap=softcap,
        )
        for name, value in normalised.items():  # frozen: the checked values, as plain floats
            object.__setattr__(self, name, value)


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise LossConfigError(name, f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise LossConfigError(name, f"{name} must be a number, got {value!r}") from None


def check_compat(compat: str) -> str:
    if compat not in COMPATS:
        raise ValueError(f"compat must be one of {COMPATS}, got {compat!r}")
    return compat


def needs_step_selection(compat: str) -> bool:
    """Whether the form's lowest-rho set spans the whole step (every micro-batch and rank), so that a
    caller splitting a step must fix it up front with `lpreg.selection_threshold`: True for "paper"
    (Eq. 6's batch-wide percentile), False for "released" (the released code selects per call)."""
    return check_compat(compat) == "paper"
