"""The trainer's one config dataclass, its presets, and the command line / YAML that override it.

Precedence, lowest first: dataclass defaults < preset < YAML file (`--config`) < command-line
flags. Every field is a flag (`--prompts-per-step 8` or `--prompts_per_step 8`).

Adding a preset: `lpreg.trainer.registry.register_preset(name, field=value, ...)`; it is then a
`--preset` choice, a `python -m lpreg.experiments.compare --preset` choice and a `preset_config(name)`
argument. The built-in ones are below (`BUILTIN_PRESETS`); the trainer's main jobs are in
lpreg/trainer/presets.py (imported here); a study registers its own (lpreg.experiments), and lists them
with `registry.register_lazy("preset", name, module)` so that asking for one imports it.
Adding a setting a study needs: `registry.register_option` (a flag, YAML key and preset field, read
with `cfg.option(name)`). Adding a built-in task: `lpreg.trainer.tasks.register_task`. Adding a loss:
see `lpreg.trainer.losses.LOSSES` (the `--loss` choices are its names). Changing the policy's output
distribution (saved with checkpoints): `lpreg.trainer.output_transform`.
"""

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional

import yaml

from lpreg import LossConfig
from lpreg.trainer import output_transform, registry
from lpreg.trainer.losses import LOSSES, LPREG_OPTIONS, lpreg_options
from lpreg.trainer.registry import OPTIONS, PRESETS

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
    # a registered change of the policy's output distribution, "NAME" or "NAME:key=value,key=value"
    # (lpreg.trainer.output_transform); saved with every checkpoint and restored on load; "" = none
    output_transform: str = ""

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
    # the largest share of unusable rows in --data / --eval-data the run accepts; past it the run stops
    # before training (each skipped row is listed in skipped_rows.jsonl either way)
    max_skipped_frac: float = 0.01

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

    # the values of registered options (lpreg.trainer.registry.register_option) this config sets; read
    # them with `option(name)`, which gives the option's default when unset
    options: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # free-form notes recorded with the run

    def option(self, name: str) -> Any:
        """The value of the registered option `name` (its default when this config does not set it)."""
        if name not in OPTIONS:
            raise ValueError(f"unknown option {name!r}; registered options: {sorted(OPTIONS)}")
        return self.options.get(name, OPTIONS[name].default)

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
        for name in ("eval_every", "lpreg_proxy_k", "eval_problems", "eval_k"):
            least = 0 if name.endswith("_every") else 1
            if getattr(self, name) < least:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(self, name)!r}")
        if self.eval_start and not self.eval_every:
            raise ValueError(f"--eval-start needs --eval-every > 0 (held-out problems), got {self.eval_every}")
        if not 0.0 <= self.max_skipped_frac <= 1.0:
            raise ValueError(f"--max-skipped-frac must be in [0, 1], got {self.max_skipped_frac!r}")
        if self.output_transform:
            output_transform.parse_spec(self.output_transform, flag="--output-transform")
        self._resolve_mini_batches()
        for name in self.options:
            if name not in OPTIONS:
                raise ValueError(f"unknown option {name!r}; registered options: {sorted(OPTIONS)}")
        for opt in OPTIONS.values():
            if opt.check is not None:
                opt.check(self)
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


BUILTIN_PRESETS: Dict[str, Dict[str, Any]] = {
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


for _name, _fields in BUILTIN_PRESETS.items():
    registry.register_preset(_name, **_fields)


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
    """The parser for a field (or a registered option) from its default (annotations are strings under
    some Pythons)."""
    default = f.default if f.default is not dataclasses.MISSING else None
    if f.name in ("model", "data", "eval_data"):
        return lambda s: None if s in ("", "none", "None") else s
    return _type_of(default)


def _type_of(default):
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
        if key in OPTIONS or registry.ensure("option", key, OPTIONS):
            out[key] = value if value is None else _type_of(OPTIONS[key].default)(value)
            continue
        if key not in cfg_fields or key == "options":
            raise ValueError(f"unknown config key {key!r} in {source}")
        f = cfg_fields[key]
        out[key] = value if (value is None or f.name == "extra") else _field_type(f)(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    lazy = sorted(f"--{name.replace('_', '-')}" for kind, name in registry.LAZY if kind == "option"
                  and name not in OPTIONS)
    lazy_presets = sorted(name for kind, name in registry.LAZY if kind == "preset" and name not in PRESETS)
    parser = argparse.ArgumentParser(
        prog="lpreg-train",
        description="RLVR (GRPO + Lp-Reg and entropy-control baselines). "
        "Precedence: preset < --config YAML < flags.",
        epilog=(f"Study options, loaded when named: {', '.join(lazy)}. " if lazy else "")
        + (f"Study presets, loaded when named: {', '.join(lazy_presets)}." if lazy_presets else "") or None,
    )
    parser.add_argument("--config", default=None, help="YAML file of config fields")
    for f in fields(TrainConfig):
        if f.name in ("extra", "options"):
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
    for opt in OPTIONS.values():
        flags = [f"--{opt.name.replace('_', '-')}"] + ([f"--{opt.name}"] if "_" in opt.name else [])
        parser.add_argument(*flags, dest=opt.name, default=argparse.SUPPRESS, type=_type_of(opt.default),
                            help=opt.help)
    return parser


def _load_named(argv: List[str]) -> None:
    """Import the modules that register what `argv` names (`registry.register_lazy`): a preset, a task,
    an output transform, or an option given as a flag, before the parser is built."""
    for i, arg in enumerate(argv):
        if not arg.startswith("--"):
            continue
        key, _, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not value and i + 1 < len(argv):
            value = argv[i + 1]
        registry.ensure("option", key, OPTIONS)
        if key in ("preset", "task"):
            registry.ensure(key, value, PRESETS if key == "preset" else _tasks())
        elif key == "output_transform" and value:
            registry.ensure("output_transform", value.split(":", 1)[0], output_transform.TRANSFORMS)


def _tasks() -> Dict[str, Any]:
    from lpreg.trainer.tasks import TASKS  # the tasks' module is light, but only a task name needs it

    return TASKS


def load_config(argv: Optional[List[str]] = None) -> TrainConfig:
    """Command line (and YAML) -> a validated TrainConfig."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _load_named(argv)
    yaml_values: Dict[str, Any] = {}
    config_path = _config_path(argv)
    if config_path:
        with open(config_path) as fh:
            yaml_values = yaml.safe_load(fh) or {}
        if not isinstance(yaml_values, dict):
            raise ValueError(f"--config {config_path!r} must hold a mapping of config fields")
        _load_named([f"--{k}={v}" for k, v in yaml_values.items()])
    args = vars(build_parser().parse_args(argv))
    cfg_fields = {f.name: f for f in fields(TrainConfig)}
    flag_values = {k: v for k, v in args.items() if k != "config"}
    yaml_values = _coerce(cfg_fields, yaml_values, config_path)
    merged = {**yaml_values, **flag_values}
    preset = merged.pop("preset", TrainConfig.preset)
    return preset_config(preset, **merged)


def _config_path(argv: List[str]) -> Optional[str]:
    """The value of --config in `argv` (the YAML is read before the parser, which its keys may extend)."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def _check_fields(name: str, values: Dict[str, Any]) -> None:
    known = {f.name for f in fields(TrainConfig)} - {"options", "extra"} | set(OPTIONS)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"preset {name!r}: unknown TrainConfig fields or options {unknown}")


def register_preset(name: str, **fields_: Any) -> None:
    """Add (or replace) a preset: `fields_` are TrainConfig fields or registered options, checked here
    by name (`lpreg.trainer.registry.register_preset` checks them when the preset is used)."""
    _check_fields(name, fields_)
    registry.register_preset(name, **fields_)


def preset_config(preset: str = "cpu-tiny", **overrides: Any) -> TrainConfig:
    """A TrainConfig from a preset plus overrides (the Python-side equivalent of the CLI); an override
    may be a TrainConfig field or a registered option."""
    if not registry.ensure("preset", preset, PRESETS):
        raise ValueError(f"--preset must be one of {tuple(sorted(PRESETS))}, got {preset!r}")
    for key in overrides:
        registry.ensure("option", key, OPTIONS)
    values = {**PRESETS[preset], **overrides, "preset": preset}
    _check_fields(preset, {k: v for k, v in values.items() if k != "preset"})
    options = {**values.pop("options", {}), **{k: values.pop(k) for k in list(values) if k in OPTIONS}}
    return TrainConfig(**values, options=options).validate()


# the trainer's main jobs (lpreg/trainer/presets.py registers them through lpreg.trainer.registry)
import lpreg.trainer.presets  # noqa: E402,F401  after the config: it may use anything above

for _name, _fields in list(PRESETS.items()):
    _check_fields(_name, _fields)
