"""The trainer's one config dataclass, its presets, and the command line / YAML that override it.

Precedence, lowest first: dataclass defaults < preset < YAML file (`--config`) < command-line
flags. Every field is a flag (`--prompts-per-step 8` or `--prompts_per_step 8`).

Adding a preset: `register_preset(name, field=value, ...)` (or one `PRESETS` entry here); it is then
a `--preset` choice, a `python -m lpreg.experiments.compare --preset` choice and a `preset_config(name)`
argument. The study's presets (cpu-demo, cpu-regime-sweep, cpu-sparks, cpu-sparks-demo, cpu-sweep) are registered by
`lpreg.experiments` (lpreg/experiments/presets.py). Adding a built-in task: `lpreg.trainer.tasks.register_task`.
Adding a loss: see `lpreg.trainer.losses.LOSSES` (the `--loss` choices are its names).
"""

import argparse
import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional

import yaml

from lpreg import LossConfig
from lpreg.trainer.losses import LOSSES, LPREG_OPTIONS, lpreg_options

STD_SCALINGS = ("group", "batch", "none")
# A loss published off-policy (`Loss.off_policy`: clip_higher, kl_cov) is exactly GRPO on-policy: at
# r = 1 the ratio clip never acts and |logp - old_logp| has zero gradient. Their papers' Table 1 runs
# used 8 updates per rollout, so they default to that (`--mini-batches 0` = auto) and refuse
# `--mini-batches 1`.
PUBLISHED_UPDATES_PER_ROLLOUT = 8


@dataclass
class TrainConfig:
    # --- run -------------------------------------------------------------------------------
    preset: str = "cpu-tiny"  # the preset this config started from (see PRESETS)
    output_dir: str = "runs/lpreg"  # metrics.jsonl, samples.jsonl, plots, checkpoints/
    steps: int = 60  # RL steps; one step = one rollout = `mini_batches` optimizer updates
    seed: int = 0  # seeds model init, data order and every rollout (with step, prompt index)
    resume: str = "auto"  # "auto" (last complete checkpoint in output_dir), a checkpoint path, or "none"
    save_every: int = 20  # checkpoint every N steps (and at the end); 0 = only at the end
    keep_checkpoints: int = 2  # complete checkpoints kept on disk
    sample_every: int = 10  # write a few completions to samples.jsonl every N steps
    plot: bool = True  # PNG plots of reward, entropy and lpreg_frac at the end of a run
    progress: bool = True  # tqdm progress bar with ETA
    torch_threads: int = 0  # torch intra-op threads; 0 = torch's default (tiny models run best on 1)

    # --- model -----------------------------------------------------------------------------
    model: Optional[str] = None  # local Hugging Face causal LM directory; None = build a tiny one
    dtype: str = "float32"  # parameter dtype: float32 | bfloat16
    hidden_size: int = 64  # tiny model only
    num_layers: int = 2  # tiny model only
    num_heads: int = 4  # tiny model only
    gradient_checkpointing: bool = False  # trade compute for activation memory (large models)

    # --- warm start (supervised fine-tuning on the task before RL) ----------------------------
    warmup_steps: int = 0  # SFT steps before RL; 0 = none (a pretrained model needs none)
    warmup_lr: float = 3e-3
    warmup_batch_size: int = 32
    warmup_eval_problems: int = 64  # held-out problems scored (greedy and sampled) after the warm start
    # a directory of warm-started weights keyed by everything the warm start depends on; "" = none.
    # Runs that differ only in their RL settings (a sweep's arms) then warm-start once per seed.
    warm_start_cache: str = ""

    # --- data ------------------------------------------------------------------------------
    data: Optional[str] = None  # jsonl / parquet of problems; None = the built-in task `task`
    task: str = "arithmetic"  # built-in task (lpreg.trainer.tasks.TASKS), used when data is None
    n_problems: int = 2000  # built-in task: size of the RL problem set (the warm start sees the whole split)
    max_operand: int = 99  # built-in task: keep problems whose operands are <= this (99 = all)

    # --- rollout ---------------------------------------------------------------------------
    prompts_per_step: int = 16  # global (all ranks) prompts per step
    samples_per_prompt: int = 8  # group size n of GRPO
    max_new_tokens: int = 8
    temperature: float = 1.0  # sampling temperature; the losses use the same T
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    reward_timeout_s: float = 5.0

    # --- held-out evaluation (lpreg.trainer.evaluate) -------------------------------------------
    eval_every: int = 0  # evaluate every N steps (and at the end); 0 = never
    eval_start: bool = False  # also evaluate before the first step (logged as step 0: the warm-started policy)
    # a directory of step-0 evaluations keyed by the warm-start cache entry and the evaluation's settings
    # ("" = none; needs --warm-start-cache): runs that differ only after the warm start (a sweep's arms
    # of one seed) evaluate the identical start once
    eval_start_cache: str = ""
    eval_problems: int = 64  # held-out problems: the built-in task's test split, or the first N of eval_data
    eval_k: int = 8  # samples per problem at the rollout temperature: avg@k, pass@1..k, maj@k
    eval_data: Optional[str] = None  # jsonl / parquet of held-out problems (needed with --data)

    # --- advantage -------------------------------------------------------------------------
    std_scaling: str = "group"  # divide (R - group mean) by the std of: group | batch | none
    adv_eps: float = 1e-6

    # --- loss ------------------------------------------------------------------------------
    loss: str = "lpreg"  # a name in lpreg.trainer.losses.LOSSES
    # token-mean: over every valid token of the mini-batch, all ranks (80_20: over its selected
    # tokens); seq-mean-token-mean / seq-mean-token-sum: per sequence, then mean over sequences
    loss_agg_mode: str = "token-mean"
    clip_low: float = 0.2  # PPO ratio clip [1 - clip_low, 1 + clip_high] of the baselines
    clip_high: float = 0.2
    clip_high_dapo: float = 0.28  # Clip-Higher (DAPO) epsilon_high; also used by 80_20 (built on DAPO)
    lpreg_compat: str = "released"  # "released" (the authors' code) | "paper" (Eq. 6), docs/spec.md §3, §3a
    lpreg_mode: str = "min_p"
    lpreg_threshold: float = 0.02  # kappa (min_p) or tau (fixed)
    lpreg_rho: float = 0.01  # fraction of lowest-probability tokens eligible for the penalty
    lpreg_beta: float = 1.0
    lpreg_clip_low: float = 1.0  # ratio clip [1 - clip_low, 1 + clip_high]: [0, 10] as in docs/spec.md §3
    lpreg_clip_high: float = 9.0
    lpreg_proxy_k: int = 64  # off-policy (mini_batches > 1): entries of the rollout policy's sparse proxy q
    entropy_coef: float = 0.002  # entropy_bonus: loss -= coef * entropy (the paper's baseline, its §5.1.2)
    top_entropy_frac: float = 0.2  # 80_20: only the ceil(frac n) highest-entropy tokens get gradient
    kl_cov_ratio: float = 0.002  # KL-Cov: fraction of top-covariance tokens penalised (7B setting)
    kl_cov_coef: float = 1.0  # KL-Cov: coefficient of |logp - old_logp|
    clip_cov_ratio: float = 0.0002  # Clip-Cov: fraction of tokens whose gradient is detached
    clip_cov_lb: float = 1.0  # Clip-Cov: covariance band (lb, ub) the detached tokens come from
    clip_cov_ub: float = 5.0
    token_stats_backend: str = "auto"

    # --- optimisation ----------------------------------------------------------------------
    lr: float = 1e-3
    lr_warmup_steps: int = 0  # linear ramp, then constant (the paper uses a constant lr)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch_size: int = 64  # sequences per forward/backward on one rank (gradient accumulation)
    # optimizer steps per rollout; > 1 makes later ones off-policy (PPO-style); 0 = the loss's
    # published setting: 8 (or the largest divisor of prompts_per_step below it) for clip_higher
    # and kl_cov, 1 for the others
    mini_batches: int = 0

    # --- Lp-Reg's mechanism, measured (the instrument lpreg.experiments.mechanism) -----------------
    # at the first step and every N steps: from the state before the update, one update with
    # beta = 1 and one with beta = 0 (on copies), and p_y after / before for the tokens the released
    # form selects (mechanism.jsonl); 0 = never. One process, one update per rollout.
    mechanism_every: int = 0

    extra: dict = field(default_factory=dict)  # free-form notes recorded with the run

    def validate(self) -> "TrainConfig":
        """Check every field (errors name the flag and the value); resolves `mini_batches` 0."""
        if self.loss not in LOSSES:
            raise ValueError(f"--loss must be one of {tuple(LOSSES)}, got {self.loss!r}")
        if self.std_scaling not in STD_SCALINGS:
            raise ValueError(f"--std-scaling must be one of {STD_SCALINGS}, got {self.std_scaling!r}")
        self.lpreg_loss_config()  # every --lpreg-* option checked now, not at the first step after the warm start
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        for name in ("steps", "prompts_per_step", "samples_per_prompt", "max_new_tokens", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)!r}")
        if self.samples_per_prompt < 2 and self.std_scaling == "group":
            raise ValueError(f"--samples-per-prompt must be >= 2 for group advantages, got {self.samples_per_prompt}")
        for name in ("eval_every", "mechanism_every", "lpreg_proxy_k", "eval_problems", "eval_k"):
            least = 0 if name.endswith("_every") else 1
            if getattr(self, name) < least:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(self, name)!r}")
        if self.eval_start and not self.eval_every:
            raise ValueError(f"--eval-start needs --eval-every > 0 (held-out problems), got {self.eval_every}")
        self._resolve_mini_batches()
        if self.mechanism_every and self.mini_batches > 1:
            raise ValueError(f"--mechanism-every measures one update per rollout: it needs --mini-batches 1, "
                             f"got {self.mini_batches}")
        return self

    def lpreg_loss_config(self) -> LossConfig:
        """The package's Lp-Reg loss options these fields set (`lpreg.LossConfig`, validated on
        construction); a bad one raises ValueError naming its flag and the value."""
        try:
            return LossConfig(**lpreg_options(self))
        except ValueError as err:
            option = str(err).split(" ", 1)[0]  # LossConfig's message starts with the option's name
            flag = f"--{LPREG_OPTIONS[option].replace('_', '-')}" if option in LPREG_OPTIONS else "an --lpreg-* option"
            raise ValueError(f"{flag}: {err}") from err

    def _resolve_mini_batches(self) -> None:
        if self.mini_batches == 0:
            want = PUBLISHED_UPDATES_PER_ROLLOUT if LOSSES[self.loss].off_policy else 1
            # the largest divisor of prompts_per_step not above the published count
            self.mini_batches = max(d for d in range(1, want + 1) if self.prompts_per_step % d == 0)
        if self.mini_batches < 1 or (self.prompts_per_step % self.mini_batches):
            raise ValueError(
                f"--mini-batches must divide --prompts-per-step ({self.prompts_per_step}), got {self.mini_batches}"
            )
        if LOSSES[self.loss].off_policy and self.mini_batches == 1:
            raise ValueError(
                f"--loss {self.loss} with --mini-batches 1 (on-policy) is exactly grpo: the ratio is 1, so its "
                f"clip / covariance penalty never acts. Use --mini-batches > 1 (the published runs used "
                f"{PUBLISHED_UPDATES_PER_ROLLOUT}; 0 picks that) and --prompts-per-step >= 2, or --loss grpo"
            )


PRESETS: Dict[str, Dict[str, Any]] = {
    # The README's main job: a 2-core CPU, no network, < 10 minutes including warm start.
    # Operands up to 19: after the warm start (SFT on the ~700 training problems) a 2-layer,
    # 128-wide model answers ~20-25% of samples correctly, so RL starts with a non-zero reward.
    # RL then works on a 64-problem set that recurs every 4 steps: a tiny model barely
    # generalises across problems, so a fresh problem per prompt would show no learning.
    "cpu-tiny": dict(
        steps=100, hidden_size=128, num_layers=2, num_heads=4, warmup_steps=400, warmup_lr=3e-3,
        warmup_batch_size=32, n_problems=64, max_operand=19, prompts_per_step=16, samples_per_prompt=8,
        max_new_tokens=6, lr=3e-4, micro_batch_size=128, save_every=25, sample_every=10, torch_threads=1,
    ),
    # The unit/integration tests: seconds per run. Operands up to 2 (one-character answers) so
    # that a few warm-start steps already give some reward.
    "test-micro": dict(
        steps=3, hidden_size=32, num_layers=2, num_heads=2, warmup_steps=40, warmup_lr=1e-2,
        warmup_batch_size=16, warmup_eval_problems=4, n_problems=8, max_operand=2, prompts_per_step=2,
        samples_per_prompt=4,
        max_new_tokens=4, lr=1e-3, micro_batch_size=4, save_every=1, sample_every=1, plot=False, torch_threads=1,
        progress=False, keep_checkpoints=3,
    ),
    # The paper's recipe (docs/spec.md §3) on a real GPU; pass --model and --data. mini_batches is
    # left to the loss (0): one update per rollout for Lp-Reg, 8 for clip_higher / kl_cov (Table 1).
    "qwen2.5-math-1.5b": dict(
        steps=500, dtype="bfloat16", gradient_checkpointing=True, warmup_steps=0,
        prompts_per_step=256, samples_per_prompt=8, max_new_tokens=3072, temperature=1.0,
        lr=1e-6, lr_warmup_steps=0, weight_decay=0.0, grad_clip=1.0, micro_batch_size=8,
        save_every=25, sample_every=10, lpreg_rho=0.01, lpreg_beta=1.0,
    ),
}


def _parse_bool(text):
    if isinstance(text, bool):
        return text
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def _field_type(f):
    """The parser for a field from its default (annotations are strings under some Pythons)."""
    default = f.default if f.default is not dataclasses.MISSING else None
    if f.name in ("model", "data", "eval_data"):
        return lambda s: None if s in ("", "none", "None") else s
    if isinstance(default, bool):
        return _parse_bool
    if isinstance(default, int):
        return int
    if isinstance(default, float):
        return float
    return str


def _coerce(cfg_fields, values, source):
    out = {}
    for key, value in values.items():
        key = key.replace("-", "_")
        if key not in cfg_fields:
            raise ValueError(f"unknown config key {key!r} in {source}")
        f = cfg_fields[key]
        out[key] = value if (value is None or f.name == "extra") else _field_type(f)(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lpreg-train",
        description="RLVR (GRPO + Lp-Reg and entropy-control baselines). "
        "Precedence: preset < --config YAML < flags.",
    )
    parser.add_argument("--config", default=None, help="YAML file of config fields")
    for f in fields(TrainConfig):
        if f.name == "extra":
            continue
        flags = [f"--{f.name.replace('_', '-')}"]
        if "_" in f.name:
            flags.append(f"--{f.name}")
        kwargs = dict(dest=f.name, default=argparse.SUPPRESS, type=_field_type(f))
        if f.name == "loss":
            kwargs["help"] = f"one of {', '.join(LOSSES)}"
        elif f.name == "preset":
            kwargs["help"] = f"one of {', '.join(PRESETS)}"
        parser.add_argument(*flags, **kwargs)
    return parser


def load_config(argv: Optional[List[str]] = None) -> TrainConfig:
    """Command line (and YAML) -> a validated TrainConfig."""
    args = vars(build_parser().parse_args(argv))
    yaml_values: Dict[str, Any] = {}
    if args.get("config"):
        with open(args["config"]) as fh:
            yaml_values = yaml.safe_load(fh) or {}
        if not isinstance(yaml_values, dict):
            raise ValueError(f"--config {args['config']!r} must hold a mapping of config fields")
    cfg_fields = {f.name: f for f in fields(TrainConfig)}
    flag_values = {k: v for k, v in args.items() if k != "config"}
    yaml_values = _coerce(cfg_fields, yaml_values, args.get("config"))
    merged = {**yaml_values, **flag_values}
    preset = merged.pop("preset", TrainConfig.preset)
    return preset_config(preset, **merged)


def register_preset(name: str, **fields_: Any) -> None:
    """Add (or replace) a preset: `fields_` are TrainConfig fields, checked here by name."""
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(fields_) - known)
    if unknown:
        raise ValueError(f"register_preset({name!r}): unknown TrainConfig fields {unknown}")
    PRESETS[name] = dict(fields_)


def preset_config(preset: str = "cpu-tiny", **overrides: Any) -> TrainConfig:
    """A TrainConfig from a preset plus overrides (the Python-side equivalent of the CLI)."""
    if preset not in PRESETS:
        raise ValueError(f"--preset must be one of {tuple(PRESETS)}, got {preset!r}")
    values = {**PRESETS[preset], **overrides, "preset": preset}
    return TrainConfig(**values).validate()
