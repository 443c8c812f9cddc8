"""Lp-Reg in TRL's GRPO trainer (trl 1.16.x): `LpRegGRPOConfig` and `LpRegGRPOTrainer`.

    from lpreg.integrations.trl import LpRegGRPOConfig, LpRegGRPOTrainer
    args = LpRegGRPOConfig(output_dir="out", lpreg_compat="released", lpreg_beta=1.0)
    trainer = LpRegGRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds)

The trainer replaces GRPO's policy loss (docs/spec.md §3) and nothing else: generation,
rewards, advantages, the optimiser and logging stay TRL's. Per micro-batch:

    stats = lpreg per-token statistics (logp, proxy_logp, kl, entropy) of the completion tokens
            (lpreg.integrations._trl_forward: fused from the hidden states and the LM head, or
            from the model's logits), inside the wrapped model's forward
    loss  = lpreg.policy_loss_from_stats(stats, A, old_logp, mask, ...) / TRL's normaliser
            - TRL's entropy bonus (entropy_coef / use_adaptive_entropy, as TRL adds it)
            + TRL's MoE load-balancing loss (router_aux_loss_coef, as TRL adds it)

Normalisation follows loss_type, exactly as TRL's:
    dapo     token-mean over the generation batch: num_tokens = TRL's num_items_in_batch per
             process and accumulation window (the same denominator TRL divides by)
    bnpo     token-mean over the micro-batch, / gradient-accumulation steps
    grpo     seq-mean-token-mean, / gradient-accumulation steps
    dr_grpo  seq-mean-token-sum / max_completion_length, / gradient-accumulation steps

The proxy q (lpreg.integrations._proxy): off-policy (TRL computes old_per_token_logps: a
generation batch spans several optimiser steps, or num_iterations > 1), q is recorded at the
forward that gives the old log-probs, and every update of that generation batch reads it.
On-policy q is the current policy. `lpreg_proxy` chooses ("rollout" / "current"; default:
rollout when off-policy).

The old log-probs are always this trainer's: wherever TRL would run its own no-grad forward for
old_per_token_logps (off-policy, or vLLM importance sampling), lpreg's forward runs instead, the
same statistics the loss's forward computes (so an on-policy ratio is exactly 1 and the vLLM
importance-sampling ratio compares the rollout engine with the trainer's own log-probs), and it
records q when q is the rollout's. Extra forward arguments (multimodal inputs) are refused there
with a ValueError; nothing falls back to TRL's forward, which would record no proxy.

Mixed precision: every lpreg forward runs inside `accelerator.autocast()`, as TRL runs its own
(TRL's redirected forward bypasses the autocast accelerate wrapped around the model's forward),
so `bf16=True` runs the backbone in bf16; the fused head keeps fp32 logits
(lpreg._fused_linear_chunks), as TRL's own head does with `cast_lm_head_to_fp32=True`.

Selection (which tokens Lp-Reg regularises) follows the form (`lpreg.needs_step_selection`):
    released  per micro-batch, as the released code does;
    paper     exact over the whole generation batch, across gradient-accumulation steps and
              ranks (`lpreg.selection_threshold` on the old log-probs; on-policy one extra
              no-grad forward per generation batch gives them).

vLLM importance-sampling weights w >= 0 (`vllm_importance_sampling_correction`), passed to
`policy_loss_from_stats(weights=w)`, whose rule (docs/spec.md §3, "Per-token weights") is:
    surrogate   multiplied by w, as TRL does (-min(rA, clip(r)A) w; for w >= 0 the same as
                folding w into the advantage);
    Lp-Reg term not weighted: beta S_t D_t pulls p(y) towards the rollout proxy q(y) at the
                sampled token, a constraint on the sampled tokens (the released code applies
                it to them as they are), not an estimate of an expectation under the trainer;
    selection   a token with w = 0 (masked by TRL's token_mask / sequence_mask modes) is not
                trained on, so it is out of the selection pool of both forms (it neither
                counts in rho's population nor can be selected); w > 0 leaves the pool as is;
    metrics     TRL's clip ratios on the unweighted advantages, as TRL computes them.

Metrics are logged the way TRL logs its own: lpreg/kl, lpreg/frac, lpreg/threshold, entropy,
clip_ratio/{low_mean, high_mean, region_mean, low_min, high_max}, and policy_loss,
entropy_coef, aux_loss when TRL would log them.

This touches TRL internals (`_compute_loss`, `_prepare_inputs`, `_generate_and_score_completions`,
`_get_per_token_logps_and_entropies`, `_buffered_inputs`, `_metrics`, the entropy controller's
state), hence the pinned range below.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import trl
from packaging.version import Version
from torch import Tensor
from trl import GRPOConfig, GRPOTrainer
from trl.models.utils import _ForwardRedirection
from trl.trainer.utils import nanmax, nanmin

from .. import LossConfig, needs_step_selection
from ..policy_loss import policy_loss_from_stats
from ..selection import SelectionThreshold, selection_threshold
from . import _proxy, _trl_forward
from ._core import loss_config

TRL_RANGE = (Version("1.16"), Version("1.17"))
if not (TRL_RANGE[0] <= Version(trl.__version__) < TRL_RANGE[1]):
    raise ImportError(f"lpreg.integrations.trl is tested with trl >= {TRL_RANGE[0]}, < {TRL_RANGE[1]} (it overrides "
                      f"private members of GRPOTrainer), got trl {trl.__version__}; pip install 'lpreg[trl]'")

SUPPORTED_LOSS_TYPES = ("dapo", "bnpo", "grpo", "dr_grpo")
_AGG = {"dapo": "token-mean", "bnpo": "token-mean", "grpo": "seq-mean-token-mean", "dr_grpo": "seq-mean-token-sum"}
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                    "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")
_OLD_KEY = "lpreg_old_logps"  # (B, C) no-grad log-probs of the generation batch (paper selection, on-policy)
_SEL_KEY = "lpreg_selection"  # SelectionThreshold of one micro-batch
_IS_KEY = "importance_sampling_ratio"


@dataclass
class LpRegGRPOConfig(GRPOConfig):
    """GRPOConfig plus the Lp-Reg hyper-parameters (docs/spec.md §1, §3)."""

    lpreg_compat: str = field(default="released", metadata={
        "help": "'released' (the authors' code: k3 estimator, per-micro-batch selection among A < 0 tokens) or "
                "'paper' (full KL, selection exact over the generation batch)."})
    lpreg_mode: str = field(default="min_p", metadata={"help": "Proxy filter: 'min_p' (kappa) or 'fixed' (tau)."})
    lpreg_threshold: float = field(default=0.02, metadata={"help": "kappa for min_p, tau for fixed."})
    lpreg_rho: float = field(default=0.01, metadata={"help": "Fraction of lowest-probability tokens regularised."})
    lpreg_beta: float = field(default=1.0, metadata={"help": "Weight of the Lp-Reg term (0: TRL's own loss)."})
    lpreg_kl_estimator: Optional[str] = field(default=None, metadata={
        "help": "Divergence D_t: 'k3' (sampled token) or 'full' (KL over the vocabulary); None: k3 for released, "
                "full for paper."})
    lpreg_proxy: Optional[str] = field(default=None, metadata={
        "help": "Where the proxy q comes from: 'rollout' (recorded at the old-log-prob forward, used by every update "
                "of the generation batch) or 'current' (the policy being trained); None: rollout when off-policy."})
    lpreg_proxy_topk: int = field(default=64, metadata={
        "help": "Entries of the sparse rollout proxy (full KL only): 8 k + 8 bytes per completion token."})
    lpreg_fused: bool = field(default=True, metadata={
        "help": "Statistics from hidden states and the output-embedding weight, chunk by chunk, without the "
                "(B, C, V) logits; False: from the model's own logits."})
    lpreg_chunk_size: Optional[int] = field(default=None, metadata={
        "help": "Token rows per chunk of the fused path (None: about 32 MiB of fp32 logits on CPU, 128 MiB on CUDA)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.lpreg_loss_config()
        _proxy.check_source(self.lpreg_proxy, "lpreg_proxy")
        _proxy.check_topk(self.lpreg_proxy_topk, "lpreg_proxy_topk")
        if self.lpreg_chunk_size is not None and (isinstance(self.lpreg_chunk_size, bool)
                                                  or not isinstance(self.lpreg_chunk_size, int)
                                                  or self.lpreg_chunk_size < 1):
            raise ValueError(f"lpreg_chunk_size must be None or an int >= 1, got {self.lpreg_chunk_size!r}")

    def lpreg_loss_config(self) -> LossConfig:
        """The lpreg_* settings as an `lpreg.LossConfig` (validated; errors name the lpreg_ field)."""
        return loss_config(vars(self))


def check_args(args: GRPOConfig) -> None:
    """Raise ValueError naming the first GRPO setting this trainer does not implement."""
    if not (isinstance(args, GRPOConfig) and hasattr(args, "lpreg_compat")):
        raise ValueError(f"args must be an LpRegGRPOConfig, got {type(args).__name__}")
    if args.loss_type not in SUPPORTED_LOSS_TYPES:
        raise ValueError(f"loss_type={args.loss_type!r} is not supported with Lp-Reg; "
                         f"use one of {SUPPORTED_LOSS_TYPES}")
    unsupported = [
        ("importance_sampling_level", args.importance_sampling_level != "token", "'token'"),
        ("beta", args.beta != 0.0, "0.0 (Lp-Reg's recipe has no reference-model KL)"),
        ("delta", args.delta is not None, "None"),
        ("top_entropy_quantile", args.top_entropy_quantile < 1.0, "1.0"),
        ("off_policy_mask_threshold", args.off_policy_mask_threshold is not None, "None"),
    ]
    for name, bad, want in unsupported:
        if bad:
            raise ValueError(f"{name}={getattr(args, name)!r} is not supported by LpRegGRPOTrainer; set {name}={want}")


def check_model(args: "LpRegGRPOConfig", model_config) -> None:
    """Raise ValueError for model features the fused path does not implement."""
    text = model_config.get_text_config()
    if args.lpreg_fused:
        for name in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling"):
            if getattr(text, name, None) not in (None, 1.0):
                raise ValueError(f"lpreg_fused=True needs plain logits = hidden @ W.T; this model sets "
                                 f"{name}={getattr(text, name)!r}: use lpreg_fused=False")


class LpRegGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose policy loss is Lp-Reg (see the module docstring)."""

    # TRL's adaptive entropy state (GRPOTrainer.__init__ sets it; _lpreg_entropy_bonus updates it)
    entropy_coef: float
    _last_world_entropy: float
    _entropy_window_stats: Optional[Tensor]

    def __init__(self, model: Any, reward_funcs: Any = None, args: Optional[LpRegGRPOConfig] = None,
                 **kwargs: Any) -> None:
        check_args(args)  # before TRL builds anything (e.g. a reference model for beta != 0)
        super().__init__(model, reward_funcs, args, **kwargs)
        check_model(self.args, self.model.config)
        a = self.args
        self._lpreg_redirect = _ForwardRedirection()
        self._lpreg_opts = dict(temperature=self.temperature, mode=a.lpreg_mode, threshold=a.lpreg_threshold)
        # TRL's own test for old_per_token_logps: the generation batch outlives one optimiser step
        generate_every = a.steps_per_generation * self.num_iterations
        self.lpreg_off_policy = a.gradient_accumulation_steps % generate_every != 0
        self._lpreg_record = _proxy.use_rollout(a.lpreg_proxy, self.lpreg_off_policy)
        self._lpreg_sparse = a.lpreg_loss_config().kl_estimator == "full"  # the full KL reads q over K
        self._lpreg_capture: Optional[Dict[str, Tensor]] = None
        self._lpreg_generating = False  # inside _generate_and_score_completions: old log-probs are ours

    # ---- forwards, each through the wrapped model's forward (DDP / FSDP2 / ZeRO-3 hooks)

    def _lpreg_forward(self, model, fn, *args, **kwargs):
        unwrapped = self.accelerator.unwrap_model(model)
        # the redirection swaps out the forward accelerate wrapped in autocast: enter it here, as TRL does
        with self.accelerator.autocast():
            return self._lpreg_redirect(model, unwrapped, fn, unwrapped, *args, **kwargs)

    def _lpreg_inputs(self, inputs: Dict[str, Any]):
        if any(inputs.get(k) is not None for k in _MULTIMODAL_KEYS):
            raise ValueError("multimodal inputs (pixel_values, ...) are not supported by LpRegGRPOTrainer")
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        mask = inputs["completion_mask"]
        if inputs.get("tool_mask") is not None:
            mask = mask * inputs["tool_mask"]
        labels = completion_ids.masked_fill(mask == 0, -100)
        return input_ids, attention_mask, mask, labels

    # ---- the old-log-prob forward: always ours (it also records the rollout proxy when q is the rollout's)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **kwargs):
        if not self._lpreg_generating or torch.is_grad_enabled():
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                **kwargs)
        extra = sorted(k for k, v in kwargs.items() if v is not None)
        if extra:  # TRL's own forward would run instead, and record no proxy: refuse, never fall back
            raise ValueError(f"LpRegGRPOTrainer computes the old log-probs with its own forward and does not support "
                             f"the extra forward arguments {extra} (multimodal inputs)")
        if compute_aux_loss:
            raise ValueError("LpRegGRPOTrainer's old-log-prob forward does not compute the MoE aux loss "
                             "(compute_aux_loss=True)")
        # TRL's old_per_token_logps forward of a generation batch: one forward gives the old log-probs
        # and, when the loss reads the rollout's q, records it (TRL scores the completion positions
        # whose attention mask is 1)
        labels = input_ids.masked_fill(attention_mask == 0, -100)[:, -logits_to_keep:]
        step = batch_size or input_ids.shape[0]
        capture, a = self._lpreg_capture, self.args
        parts = []
        for start in range(0, input_ids.shape[0], step):
            rows = slice(start, start + step)
            if capture is not None:
                parts.append(self._lpreg_forward(
                    model, _trl_forward.rollout_record, input_ids[rows], attention_mask[rows], labels[rows],
                    fused=a.lpreg_fused, chunk_size=a.lpreg_chunk_size, opts=self._lpreg_opts,
                    sparse=self._lpreg_sparse, topk=a.lpreg_proxy_topk))
            else:  # the loss's own statistics, no grad: the same log-probs the update will compute
                stats = self._lpreg_forward(model, _trl_forward.token_stats, input_ids[rows], attention_mask[rows],
                                            labels[rows], fused=a.lpreg_fused, chunk_size=a.lpreg_chunk_size,
                                            opts=self._lpreg_opts)[0]
                parts.append({"logp": stats.logp, "entropy": stats.entropy})
        record = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        if capture is not None:
            capture.update({k: v for k, v in record.items() if k not in ("logp", "entropy")})
        return record["logp"], (record["entropy"] if compute_entropy else None), None

    def _generate_and_score_completions(self, inputs):
        if not getattr(self, "_lpreg_checked", False):  # start-up, before the first rollout (model prepared)
            _trl_forward.check_head_unit(self.accelerator.unwrap_model(self.model), self.args.lpreg_fused)
            self._lpreg_checked = True
        self._lpreg_capture = {} if self._lpreg_record and self.model.training else None
        self._lpreg_generating = True
        try:
            out = super()._generate_and_score_completions(inputs)
            out.update(self._lpreg_capture or {})
        finally:
            self._lpreg_capture, self._lpreg_generating = None, False
        if needs_step_selection(self.args.lpreg_compat) and self.model.training \
                and out.get("old_per_token_logps") is None:
            out[_OLD_KEY] = self._lpreg_old_logps(out)
        return out

    @torch.no_grad()
    def _lpreg_old_logps(self, batch: Dict[str, Any]) -> Tensor:
        """(B, C) log-probs of the whole generation batch, per_device_train_batch_size rows at a time
        (the micro-batch size the loss will see, so the same kernels produce the same values)."""
        input_ids, attention_mask, _, labels = self._lpreg_inputs(batch)
        step = self.args.per_device_train_batch_size
        parts = [self._lpreg_forward(self.model, _trl_forward.token_stats, input_ids[r], attention_mask[r], labels[r],
                                     fused=self.args.lpreg_fused, chunk_size=self.args.lpreg_chunk_size,
                                     opts=self._lpreg_opts)[0].logp
                 for r in (slice(i, i + step) for i in range(0, input_ids.shape[0], step))]
        return torch.cat(parts).float()

    # ---- paper form: the step-wide selection, once per generation batch

    def _prepare_inputs(self, generation_batch):
        before = self._buffered_inputs
        out = super()._prepare_inputs(generation_batch)
        batches: Optional[List[Dict[str, Any]]] = self._buffered_inputs
        if needs_step_selection(self.args.lpreg_compat) and self.model.training and batches is not before:
            # a new generation batch: one threshold for all of its micro-batches on every rank; the
            # pool is the tokens TRL trains on (w > 0 under vLLM importance sampling)
            olds = [b.get("old_per_token_logps", b.get(_OLD_KEY)) for b in batches]
            masks = [self._lpreg_pool(b) for b in batches]
            sels = selection_threshold(olds, masks, rho=self.args.lpreg_rho)
            for b, s in zip(batches, sels):
                b[_SEL_KEY] = s
        return out

    def _lpreg_weights(self, inputs) -> Optional[Tensor]:
        """TRL's importance-sampling weight w (B, C) or (B, 1), or None."""
        if self.use_vllm and self.vllm_importance_sampling_correction and inputs.get(_IS_KEY) is not None:
            return inputs[_IS_KEY]
        return None

    def _lpreg_pool(self, inputs) -> Tensor:
        mask = self._lpreg_inputs(inputs)[2]
        w = self._lpreg_weights(inputs)
        return mask if w is None else mask * (w > 0)

    # ---- the loss

    def _normalisation(self, inputs, mode: str):
        """(loss_agg_mode, num_tokens, divisor) reproducing TRL's loss_type."""
        lt = self.loss_type
        accum = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        if lt == "dapo":
            # TRL: num_items_in_batch spans the generation batch of every process; per process and
            # accumulation window the denominator is num_items / P * accum / steps_per_generation
            n = inputs["num_items_in_batch"].clamp(min=1.0).float() / self.accelerator.num_processes
            if mode == "train":
                n = n * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            return "token-mean", n, 1.0
        if lt == "dr_grpo":
            return "seq-mean-token-sum", None, accum * self.max_completion_length
        return _AGG[lt], None, accum

    def _compute_loss(self, model, inputs):
        a = self.args
        mode = "train" if self.model.training else "eval"
        input_ids, attention_mask, mask, labels = self._lpreg_inputs(inputs)
        proxy = _proxy.sparse_proxy(inputs)
        stats, aux_loss = self._lpreg_forward(
            model, _trl_forward.token_stats, input_ids, attention_mask, labels, fused=a.lpreg_fused,
            chunk_size=a.lpreg_chunk_size, opts=self._lpreg_opts, proxy=proxy, aux=self.aux_loss_enabled)
        if proxy is None and inputs.get(_proxy.ROLLOUT_LOGQ) is not None:
            stats = _proxy.with_rollout_logq(stats, inputs[_proxy.ROLLOUT_LOGQ])
        adv = inputs["advantages"]
        adv = (adv[:, None] if adv.dim() == 1 else adv).expand_as(mask).float()
        w = self._lpreg_weights(inputs)
        if w is not None:  # the rule of the module docstring, lpreg's own (docs/spec.md §3, "Per-token weights")
            w = w.float().expand_as(mask)  # TRL's sequence-level modes give (B, 1)
        old = inputs.get("old_per_token_logps")  # None: on-policy, ratio exactly 1 (as TRL)
        sel: Optional[SelectionThreshold] = inputs.get(_SEL_KEY) if mode == "train" else None
        agg, num_tokens, divisor = self._normalisation(inputs, mode)
        policy_loss, m = policy_loss_from_stats(
            stats, adv, old, mask, compat=a.lpreg_compat, rho=a.lpreg_rho, beta=a.lpreg_beta,
            clip_low=self.epsilon_low, clip_high=self.epsilon_high, loss_agg_mode=agg,
            kl_estimator=a.lpreg_kl_estimator, selection_threshold=sel, num_tokens=num_tokens, weights=w,
            return_tensors=True)
        loss = policy_loss / divisor
        if self._entropy_bonus_enabled:
            loss = self._lpreg_entropy_bonus(loss, policy_loss.detach(), stats.entropy, mask, mode)
        if self.aux_loss_enabled:  # TRL's MoE load-balancing loss, scaled for accumulation as TRL scales it
            accum = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            loss = loss + self.router_aux_loss_coef * aux_loss / accum
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        self._lpreg_log(mode, stats, old, adv, mask, m)
        return loss

    def _lpreg_entropy_bonus(self, loss: Tensor, policy_loss: Tensor, entropy: Tensor, mask: Tensor,
                             mode: str) -> Tensor:
        """TRL 1.16's entropy bonus (GRPOTrainer._compute_loss), on lpreg's entropy H(p) of the same
        tokens: loss - c * (token-mean of H over the micro-batch) / accumulation steps, with c the
        static coefficient, or the adaptive one of the previous optimiser step (applied only while the
        window entropy was <= entropy_target), updated from the window-global entropy at each step."""
        fmask = mask.float()
        accum = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        entropy_loss = (entropy * fmask).sum() / fmask.sum().clamp(min=1.0) / accum
        if self.use_adaptive_entropy:
            coef = self.entropy_coef if self._last_world_entropy <= self.args.entropy_target else 0.0
        else:
            coef = self.entropy_coef
        loss = loss - coef * entropy_loss
        self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
        if self.use_adaptive_entropy and mode == "train":
            window = torch.stack([(entropy * fmask).sum(), fmask.sum()]).detach()
            self._entropy_window_stats = window if self._entropy_window_stats is None \
                else self._entropy_window_stats + window
            if self.accelerator.sync_gradients:
                total = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
                world = (total[0] / total[1].clamp(min=1.0)).item()
                a = self.args
                if world <= a.entropy_target:
                    self.entropy_coef = min(self.entropy_coef + a.entropy_coef_delta, a.entropy_coef_max)
                else:
                    self.entropy_coef = max(self.entropy_coef - a.entropy_coef_delta, a.entropy_coef_min)
                self._last_world_entropy = world
                self._entropy_window_stats = None
        if mode == "train" and self.accelerator.sync_gradients:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
        return loss

    def _lpreg_log(self, mode: str, stats, old: Optional[Tensor], adv: Tensor, mask: Tensor,
                   m: Dict[str, Tensor]) -> None:
        """TRL's way: one float per micro-batch in self._metrics[mode], reduced over processes."""
        fmask = mask.float()
        n = fmask.sum()
        logp = stats.logp.detach()
        coef = torch.exp(logp - (logp if old is None else old))
        low = ((coef < 1 - self.epsilon_low) & (adv < 0)).float()
        high = ((coef > 1 + self.epsilon_high) & (adv > 0)).float()
        n_sel = m["actor/lpreg_frac"] * n
        local = torch.stack([
            (stats.entropy.detach() * fmask).sum(), (low * fmask).sum(), (high * fmask).sum(),
            (torch.maximum(low, high) * fmask).sum(), m["actor/lpreg_kl"] * n_sel, n_sel, n,
            m["actor/lpreg_threshold"]])
        tot = self.accelerator.reduce(local, reduction="sum")
        count = tot[6].clamp(min=1.0)
        metrics = self._metrics[mode]
        metrics["entropy"].append((tot[0] / count).item())
        metrics["clip_ratio/low_mean"].append((tot[1] / count).item())
        metrics["clip_ratio/high_mean"].append((tot[2] / count).item())
        metrics["clip_ratio/region_mean"].append((tot[3] / count).item())
        # TRL's per-sequence extremes: the mean over each sequence's tokens, min / max over every process
        seq = fmask.sum(-1)
        metrics["clip_ratio/low_min"].append(nanmin(self.accelerator.gather((low * fmask).sum(-1) / seq)).item())
        metrics["clip_ratio/high_max"].append(nanmax(self.accelerator.gather((high * fmask).sum(-1) / seq)).item())
        metrics["lpreg/kl"].append((tot[4] / tot[5].clamp(min=1.0)).item())
        metrics["lpreg/frac"].append((tot[5] / count).item())
        metrics["lpreg/threshold"].append((tot[7] / self.accelerator.num_processes).item())
