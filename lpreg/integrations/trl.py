"""Lp-Reg in TRL's GRPO trainer (trl 1.16.x): `LpRegGRPOConfig` and `LpRegGRPOTrainer`.

    from lpreg.integrations.trl import LpRegGRPOConfig, LpRegGRPOTrainer
    args = LpRegGRPOConfig(output_dir="out", lpreg_compat="released", lpreg_beta=1.0)
    trainer = LpRegGRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds)

Lp-Reg is a regulariser over whichever objective TRL trains (docs/spec.md, "Lp-Reg over any base
objective"): every TRL 1.16 loss_type (grpo, dr_grpo, dapo, bnpo, cispo, sapo, luspo, vespo) and
option (importance_sampling_level="sequence" (GSPO), delta, the reference KL beta != 0,
top_entropy_quantile < 1, off_policy_mask_threshold, the entropy bonus, the vLLM importance-sampling
correction, the MoE aux loss). Per micro-batch:

    stats = lpreg per-token statistics (logp, proxy_logp, kl, entropy) of the completion tokens
            (lpreg.integrations._trl_forward: fused from the hidden states and the LM head, or
            from the model's logits), inside the wrapped model's forward
    loss  = TRL's own GRPOTrainer._compute_loss on stats.logp and stats.entropy (its base loss, masks,
            weights, reference KL, aggregation, entropy bonus, aux loss and metrics, unchanged)
            + TRL's aggregation of the Lp-Reg term (lpreg.integrations._trl_losses):
              paper     beta S_t D_t
              released  S_t w_t (surrogate_t - base_t) + beta S_t D_t  (a selected token trains on the
                        raw-ratio -A r with the upper caps, delta / CISPO's, instead of TRL's base)
            with S_t, D_t from `lpreg.lpreg_regularize`; a token TRL weights by 0 (the 80/20 mask, the
            off-policy mask, a vLLM importance-sampling mask) is outside the selection pool.
So at lpreg_beta = 0 the loss is TRL's, term for term. compat="released" over a sequence-ratio objective
(GSPO, luspo, vespo) is refused at construction, naming the option (`_trl_losses.released_refusal`).

The proxy q (lpreg.integrations._proxy): off-policy (TRL computes old_per_token_logps: a
generation batch spans several optimiser steps, or num_iterations > 1), q is recorded at the
forward that gives the old log-probs, and every update of that generation batch reads it.
On-policy q is the current policy. `lpreg_proxy` chooses ("rollout" / "current"; default:
rollout when off-policy).

The old log-probs are always this trainer's: wherever TRL would run its own no-grad forward of the
policy for old_per_token_logps (off-policy, or vLLM importance sampling), lpreg's forward runs
instead, the same statistics the loss's forward computes (so an on-policy ratio is exactly 1 and the
vLLM importance-sampling ratio compares the rollout engine with the trainer's own log-probs), and it
records q when q is the rollout's. The reference model's log-probs (beta != 0) are TRL's own forward.
Extra forward arguments (multimodal inputs) are refused with a ValueError; nothing falls back to
TRL's forward, which would record no proxy.

Mixed precision: every lpreg forward runs inside `accelerator.autocast()`, as TRL runs its own, so
`bf16=True` runs the backbone in bf16; the fused head keeps fp32 logits (lpreg._fused_linear_chunks).

Scaled and soft-capped LM heads (Gemma 2/3, Cohere, Granite, ...): the fused path reads the logit
transform from the model config (`lpreg.logit_transform_from_config`) and applies it in the fused
kernels; before the first fused step the head guard (lpreg.integrations._head_guard) compares the
fused log-probs of a few tokens with the model's own forward().logits and raises on a difference
beyond the dtype's tolerance (a head no config describes: remote code, a subclass).

Selection (which tokens Lp-Reg regularises) follows the form (`lpreg.needs_step_selection`):
    released  per micro-batch, as the released code does;
    paper     exact over the whole generation batch, across gradient-accumulation steps and
              ranks (`lpreg.selection_threshold` on the old log-probs; on-policy one extra
              no-grad forward per generation batch gives them); its pool is the tokens TRL
              trains on that are known at generation (importance-sampling weight > 0); a token
              that a mask computed at the update (80/20, off-policy) drops is not selected.

Metrics, pooled exactly over the logging window's micro-batches and ranks (sums and counts kept
per micro-batch, reduced across ranks and divided when TRL logs): lpreg/candidates (the lowest-rho
pool's size), lpreg/filtered_frac (the share of candidates whose token the proxy filters),
lpreg/selected (tokens selected), lpreg/kept_mass and lpreg/push (means of m and 1/m - 1 over the
selected tokens), lpreg/p_y (mean p_y there), lpreg/frac (selected / valid tokens), lpreg/kl (mean
D_t over the selected tokens), lpreg/threshold (the largest p_y among the candidates). TRL logs its
own (entropy, clip ratios, kl, policy_loss with the Lp-Reg term, entropy_coef, aux_loss).

This touches TRL internals (`_compute_loss`, `_prepare_inputs`, `_generate_and_score_completions`,
`_get_per_token_logps_and_entropies`, `get_high_entropy_mask`, `get_off_policy_mask`,
`_buffered_inputs`, `_metrics`, `log`), hence the pinned range below.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import trl
from packaging.version import Version
from torch import Tensor
from trl import GRPOConfig, GRPOTrainer
from trl.models.utils import _ForwardRedirection
from trl.trainer.utils import maybe_gather_lm_head_ctx

from .. import LossConfig, needs_step_selection
from ..logit_transform import LogitTransform, logit_transform_from_config
from ..regularize import LossTerms, lpreg_regularize, mechanism_metrics, mechanism_sums
from ..selection import SelectionThreshold, selection_threshold
from . import _head_guard, _proxy, _trl_forward, _trl_losses
from ._core import loss_config

TRL_RANGE = (Version("1.16"), Version("1.17"))
if not (TRL_RANGE[0] <= Version(trl.__version__) < TRL_RANGE[1]):
    raise ImportError(f"lpreg.integrations.trl is tested with trl >= {TRL_RANGE[0]}, < {TRL_RANGE[1]} (it overrides "
                      f"private members of GRPOTrainer), got trl {trl.__version__}; pip install 'lpreg[trl]'")

SUPPORTED_LOSS_TYPES = _trl_losses.LOSS_TYPES
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                    "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")
_OLD_KEY = "lpreg_old_logps"  # (B, C) no-grad log-probs of the generation batch (paper selection, on-policy)
_SEL_KEY = "lpreg_selection"  # SelectionThreshold of one micro-batch
_IS_KEY = "importance_sampling_ratio"
# the pooled metrics: lpreg.mechanism_sums' keys, then the divergence over the selected tokens and the valid count
_EXTRA_SUMS = ("divergence", "valid")
_MECHANISM_LOGS = ("candidates", "filtered_frac", "selected", "kept_mass", "push", "p_y")


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
    """Raise ValueError naming the first GRPO setting Lp-Reg cannot compose with (at construction)."""
    if not (isinstance(args, GRPOConfig) and hasattr(args, "lpreg_compat")):
        raise ValueError(f"args must be an LpRegGRPOConfig, got {type(args).__name__}")
    if args.loss_type not in SUPPORTED_LOSS_TYPES:
        raise ValueError(f"loss_type={args.loss_type!r} is not a TRL 1.16 loss type LpRegGRPOTrainer knows; "
                         f"use one of {SUPPORTED_LOSS_TYPES}")
    if args.lpreg_compat == "released":
        refusal = _trl_losses.released_refusal(args.loss_type, args.importance_sampling_level)
        if refusal is not None:
            raise ValueError(refusal)


class LpRegGRPOTrainer(GRPOTrainer):
    """GRPOTrainer with Lp-Reg over TRL's own loss (see the module docstring)."""

    def __init__(self, model: Any, reward_funcs: Any = None, args: Optional[LpRegGRPOConfig] = None,
                 **kwargs: Any) -> None:
        check_args(args)  # before TRL builds anything (e.g. a reference model for beta != 0)
        super().__init__(model, reward_funcs, args, **kwargs)
        a = self.args
        self._lpreg_redirect = _ForwardRedirection()
        self._lpreg_opts: Dict[str, Any] = dict(temperature=self.temperature, mode=a.lpreg_mode,
                                                threshold=a.lpreg_threshold)
        # the fused path applies the head's logit transform (scaled / soft-capped heads) itself
        self.lpreg_transform: LogitTransform = logit_transform_from_config(self.model.config)
        self._lpreg_fused_opts = dict(self._lpreg_opts)
        if not self.lpreg_transform.is_identity:
            self._lpreg_fused_opts.update(logit_scale=self.lpreg_transform.scale,
                                          logit_softcap=self.lpreg_transform.softcap)
        # TRL's own test for old_per_token_logps: the generation batch outlives one optimiser step
        generate_every = a.steps_per_generation * self.num_iterations
        self.lpreg_off_policy = a.gradient_accumulation_steps % generate_every != 0
        self._lpreg_record = _proxy.use_rollout(a.lpreg_proxy, self.lpreg_off_policy)
        self._lpreg_sparse = a.lpreg_loss_config().kl_estimator == "full"  # the full KL reads q over K
        self._lpreg_capture: Optional[Dict[str, Tensor]] = None
        self._lpreg_old_forward = False  # the next no-grad policy forward gives TRL's old log-probs: ours
        self._lpreg_pending: Optional[tuple] = None  # the loss forward's (logp, entropy, aux) for TRL's loss
        self._lpreg_masks: Dict[str, Tensor] = {}  # TRL's 80/20 and off-policy masks of this micro-batch
        self._lpreg_sums: Dict[str, Dict[str, Tensor]] = {}  # per mode: pooled sums of the logging window
        self._lpreg_threshold: Dict[str, Tensor] = {}  # per mode: the largest candidate p_y of the window

    # ---- forwards, each through the wrapped model's forward (DDP / FSDP2 / ZeRO-3 hooks)

    def _lpreg_forward(self, model, fn, *args, **kwargs):
        unwrapped = self.accelerator.unwrap_model(model)
        # the redirection swaps out the forward accelerate wrapped in autocast: enter it here, as TRL does
        with self.accelerator.autocast():
            return self._lpreg_redirect(model, unwrapped, fn, unwrapped, *args, **kwargs)

    def _lpreg_stats_opts(self) -> Dict[str, Any]:
        return self._lpreg_fused_opts if self.args.lpreg_fused else self._lpreg_opts

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

    # ---- TRL's per-token forward: the loss's is lpreg's; the old-log-prob one is lpreg's (it records q)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **kwargs):
        if self._lpreg_pending is not None:  # inside TRL's _compute_loss: the statistics lpreg's forward computed
            logp, entropy, aux_loss = self._lpreg_pending
            self._lpreg_pending = None
            return logp, (entropy if compute_entropy else None), (aux_loss if compute_aux_loss else None)
        if not self._lpreg_old_forward or torch.is_grad_enabled() or model is not self.model:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                **kwargs)
        # the first no-grad policy forward of a generation batch is TRL's old_per_token_logps (a later one,
        # a PEFT reference with the adapter disabled, is TRL's own)
        self._lpreg_old_forward = False
        extra = sorted(k for k, v in kwargs.items() if v is not None)
        if extra:  # TRL's own forward would run instead, and record no proxy: refuse, never fall back
            raise ValueError(f"LpRegGRPOTrainer computes the old log-probs with its own forward and does not support "
                             f"the extra forward arguments {extra} (multimodal inputs)")
        if compute_aux_loss:
            raise ValueError("LpRegGRPOTrainer's old-log-prob forward does not compute the MoE aux loss "
                             "(compute_aux_loss=True)")
        # one forward gives the old log-probs and, when the loss reads the rollout's q, records it (TRL
        # scores the completion positions whose attention mask is 1)
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
                    sparse=self._lpreg_sparse, topk=a.lpreg_proxy_topk, transform=self.lpreg_transform))
            else:  # the loss's own statistics, no grad: the same log-probs the update will compute
                stats = self._lpreg_forward(model, _trl_forward.token_stats, input_ids[rows], attention_mask[rows],
                                            labels[rows], fused=a.lpreg_fused, chunk_size=a.lpreg_chunk_size,
                                            opts=self._lpreg_stats_opts())[0]
                parts.append({"logp": stats.logp, "entropy": stats.entropy})
        record = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        if capture is not None:
            capture.update({k: v for k, v in record.items() if k not in ("logp", "entropy")})
        return record["logp"], (record["entropy"] if compute_entropy else None), None

    def _lpreg_check_head(self, batch: Dict[str, Any]) -> None:
        """Start-up, before the first fused step: the FSDP2 layout of the head, and the head guard (fused
        log-probs of a few tokens against the model's own forward().logits)."""
        model = self.accelerator.unwrap_model(self.model)
        _trl_forward.check_head_unit(model, self.args.lpreg_fused)
        if self.args.lpreg_fused:
            input_ids, attention_mask, _, _ = self._lpreg_inputs(batch)
            args = (input_ids[:1], attention_mask[:1], self.lpreg_transform)
            if _trl_forward._zero3():  # DeepSpeed's hooks gather each module; the head's read is gathered here
                with maybe_gather_lm_head_ctx(*_trl_forward._head(model)), self.accelerator.autocast():
                    _head_guard.check_fused_head(model, *args, temperature=self.temperature)
            else:  # inside the root's forward (FSDP2 unshards the root unit's parameters: embedding, head)
                self._lpreg_forward(self.model, _head_guard.check_fused_head, *args, temperature=self.temperature)
        self._lpreg_checked = True

    def _generate_and_score_completions(self, inputs):
        self._lpreg_capture = {} if self._lpreg_record and self.model.training else None
        vllm_is = bool(self.use_vllm and self.vllm_importance_sampling_correction)
        self._lpreg_old_forward = self.lpreg_off_policy or vllm_is
        try:
            out = super()._generate_and_score_completions(inputs)
            out.update(self._lpreg_capture or {})
        finally:
            self._lpreg_capture, self._lpreg_old_forward = None, False
        if not getattr(self, "_lpreg_checked", False):
            self._lpreg_check_head(out)
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
                                     opts=self._lpreg_stats_opts())[0].logp
                 for r in (slice(i, i + step) for i in range(0, input_ids.shape[0], step))]
        return torch.cat(parts).float()

    # ---- paper form: the step-wide selection, once per generation batch

    def _prepare_inputs(self, generation_batch):
        before = self._buffered_inputs
        out = super()._prepare_inputs(generation_batch)
        batches: Optional[List[Dict[str, Any]]] = self._buffered_inputs
        if needs_step_selection(self.args.lpreg_compat) and self.model.training and batches is not before:
            # a new generation batch: one threshold for all of its micro-batches on every rank; the
            # pool is the tokens TRL trains on that are known now (w > 0 under vLLM importance sampling)
            olds = [b.get("old_per_token_logps", b.get(_OLD_KEY)) for b in batches]
            masks = [self._lpreg_pool(b) for b in batches]
            sels = selection_threshold(olds, masks, rho=self.args.lpreg_rho)
            for b, s in zip(batches, sels):
                b[_SEL_KEY] = s
        return out

    def _lpreg_weights(self, inputs) -> Optional[Tensor]:
        """TRL's importance-sampling weight w (B, C) or (B, 1) where TRL multiplies the loss by it, or None."""
        if self.use_vllm and self.vllm_importance_sampling_correction and inputs.get(_IS_KEY) is not None \
                and _trl_losses.is_weighted(self.loss_type):
            return inputs[_IS_KEY]
        return None

    def _lpreg_pool(self, inputs) -> Tensor:
        mask = self._lpreg_inputs(inputs)[2]
        w = self._lpreg_weights(inputs)
        return mask if w is None else mask * (w > 0)

    # ---- TRL's masks, kept for the selection pool (TRL's own code computes them)

    def get_high_entropy_mask(self, entropies: Tensor, mask: Tensor, threshold: float) -> Tensor:
        out = super().get_high_entropy_mask(entropies, mask, threshold)
        self._lpreg_masks["entropy"] = out
        return out

    def get_off_policy_mask(self, advantages: Tensor, per_token_logps: Tensor, sampling_per_token_logps: Tensor,
                            mask: Tensor, off_policy_threshold: float) -> Tensor:
        out = GRPOTrainer.get_off_policy_mask(advantages, per_token_logps, sampling_per_token_logps, mask,
                                              off_policy_threshold)
        self._lpreg_masks["off_policy"] = out
        return out

    # ---- the loss

    def _compute_loss(self, model, inputs):
        a = self.args
        mode = "train" if self.model.training else "eval"
        input_ids, attention_mask, mask, labels = self._lpreg_inputs(inputs)
        proxy = _proxy.sparse_proxy(inputs)
        stats, aux_loss = self._lpreg_forward(
            model, _trl_forward.token_stats, input_ids, attention_mask, labels, fused=a.lpreg_fused,
            chunk_size=a.lpreg_chunk_size, opts=self._lpreg_stats_opts(), proxy=proxy, aux=self.aux_loss_enabled)
        if proxy is None and inputs.get(_proxy.ROLLOUT_LOGQ) is not None:
            stats = _proxy.with_rollout_logq(stats, inputs[_proxy.ROLLOUT_LOGQ])
        # TRL's loss, on lpreg's log-probs and entropies (its _get_per_token_logps_and_entropies returns them)
        self._lpreg_pending, self._lpreg_masks = (stats.logp, stats.entropy, aux_loss), {}
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self._lpreg_pending = None
        terms, policy_extra, loss_extra = self._lpreg_term(stats, inputs, mask, mode)
        if self._entropy_bonus_enabled:  # TRL's policy_loss metric (logged with the bonus) holds the Lp-Reg term
            entries = self._metrics[mode]["policy_loss"]
            entries[-1] += self.accelerator.gather(policy_extra.detach()).mean().item()
        self._lpreg_accumulate(mode, terms, mask)
        return loss + loss_extra

    def _lpreg_term(self, stats, inputs, mask: Tensor, mode: str):
        """(LossTerms, the Lp-Reg term aggregated as TRL's policy_loss, the same as TRL's returned loss)."""
        a, lt = self.args, self.loss_type
        adv = inputs["advantages"]
        adv = (adv[:, None] if adv.dim() == 1 else adv).float()
        old = inputs.get("old_per_token_logps")  # None: on-policy, ratio exactly 1 (as TRL)
        logp = stats.logp
        w_is = self._lpreg_weights(inputs)
        if w_is is not None:
            w_is = w_is.float().expand_as(mask)  # TRL's sequence-level modes give (B, 1)
        # the pool: the tokens TRL trains on (its masks and weights, as TRL applies them)
        pool = mask.float()
        for m in (self._lpreg_masks.get("off_policy"), self._lpreg_masks.get("entropy"), w_is):
            if m is not None:
                pool = pool * m.float().expand_as(pool)
        released = a.lpreg_compat == "released"
        if released:  # the swap needs TRL's per-token base (re-implemented, pinned to TRL's in the tests)
            old_t = logp.detach() if old is None else old
            base = _trl_losses.token_base_loss(
                lt, logp, old_t, adv, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high, delta=a.delta,
                sapo_temperature_pos=a.sapo_temperature_pos, sapo_temperature_neg=a.sapo_temperature_neg)
            surrogate = _trl_losses.released_surrogate(lt, logp, old_t, adv, base, delta=a.delta)
            if w_is is not None:
                base, surrogate = base * w_is, surrogate * w_is
            base, surrogate = base.expand_as(logp), surrogate.expand_as(logp)
        else:  # the paper form adds beta S D to TRL's loss: its base is not read here
            base, surrogate = torch.zeros_like(logp.detach()), None
        sel: Optional[SelectionThreshold] = inputs.get(_SEL_KEY) if mode == "train" else None
        terms = lpreg_regularize(base, stats, adv.expand_as(logp), old, mask, released_surrogate=surrogate,
                                 weights=pool, selection_threshold=sel, compat=a.lpreg_compat, rho=a.lpreg_rho,
                                 beta=a.lpreg_beta, kl_estimator=a.lpreg_kl_estimator)
        extra = a.lpreg_beta * terms.divergence
        if surrogate is not None:  # released: a selected token's base swapped for the surrogate
            extra = extra + torch.where(terms.selected, surrogate - base, torch.zeros((), device=logp.device))
        normalizer = None
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        if lt in ("cispo", "dapo", "vespo"):  # TRL's token count of one accumulation window on this process
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * self.current_gradient_accumulation_steps / a.steps_per_generation
        policy = _trl_losses.aggregate(extra, mask, loss_type=lt, max_completion_length=self.max_completion_length,
                                       normalizer=normalizer)
        return terms, policy, (policy if normalizer is not None else policy / accumulation)

    # ---- the mechanism's metrics, pooled exactly (sums and counts; reduced and divided at log time)

    def _lpreg_accumulate(self, mode: str, terms: LossTerms, mask: Tensor) -> None:
        valid = mask > 0
        sums = mechanism_sums(terms, valid)
        sums["divergence"] = terms.divergence.detach().float().sum()
        sums["valid"] = valid.float().sum()
        acc = self._lpreg_sums.get(mode)
        self._lpreg_sums[mode] = sums if acc is None else {k: acc[k] + v for k, v in sums.items()}
        cand = terms.candidate & valid
        top = torch.where(cand, terms.p_y.float(), torch.zeros((), device=mask.device)).max() if cand.numel() \
            else torch.zeros((), device=mask.device)
        prev = self._lpreg_threshold.get(mode)
        self._lpreg_threshold[mode] = top if prev is None else torch.maximum(prev, top)

    def _lpreg_pooled(self, mode: str) -> Dict[str, float]:
        """The logging window's metrics over every micro-batch and rank (collective: every rank logs)."""
        sums = self._lpreg_sums.pop(mode, None)
        top = self._lpreg_threshold.pop(mode, None)
        if sums is None or top is None:
            return {}
        keys = sorted(sums)
        total = self.accelerator.reduce(torch.stack([sums[k] for k in keys]), reduction="sum")
        pooled = dict(zip(keys, total))
        top = self.accelerator.gather(top.reshape(1)).max()
        metrics = mechanism_metrics(pooled)
        out = {f"lpreg/{k}": metrics[f"lpreg_{k}"] for k in _MECHANISM_LOGS}
        out["lpreg/frac"] = pooled["selected"] / pooled["valid"].clamp(min=1.0)
        out["lpreg/kl"] = pooled["divergence"] / pooled["selected"].clamp(min=1.0)
        out["lpreg/threshold"] = top
        values = torch.stack([v.float().reshape(()) for v in out.values()]).tolist()
        return dict(zip(out, values))

    def log(self, logs: Dict[str, float], start_time: Optional[float] = None) -> None:
        mode = "train" if self.model.training else "eval"
        pooled = self._lpreg_pooled(mode)
        logs.update({(f"eval_{k}" if mode == "eval" else k): v for k, v in pooled.items()})
        super().log(logs, start_time)
