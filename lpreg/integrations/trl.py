"""Lp-Reg in TRL's GRPO trainer (trl 1.16.x): `LpRegGRPOConfig` and `LpRegGRPOTrainer`.

    from lpreg.integrations.trl import LpRegGRPOConfig, LpRegGRPOTrainer
    args = LpRegGRPOConfig(output_dir="out", lpreg_compat="released", lpreg_beta=1.0)
    trainer = LpRegGRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds)

The trainer replaces GRPO's policy loss (docs/spec.md §3) and nothing else: generation,
rewards, advantages, the optimiser and logging stay TRL's. Per micro-batch:

    stats = lpreg per-token statistics (logp, proxy_logp, kl, entropy) of the completion tokens,
            from the backbone's hidden states and the output-embedding weight (lpreg_fused=True,
            no (B, C, V) logits) or from the model's own logits (lpreg_fused=False)
    loss  = lpreg.policy_loss.policy_loss_from_stats(stats, A, old_logp, mask, ...)

with TRL's clip range (epsilon, epsilon_high), temperature and normalisation (loss_type):
    dapo     token-mean over the generation batch: num_tokens = TRL's num_items_in_batch per
             process and accumulation window (the same denominator TRL divides by)
    bnpo     token-mean over the micro-batch, / gradient-accumulation steps
    grpo     seq-mean-token-mean, / gradient-accumulation steps
    dr_grpo  seq-mean-token-sum / max_completion_length, / gradient-accumulation steps
At lpreg_beta = 0 this is TRL's own loss (tests/integrations/test_trl.py checks the loss, the
gradient norm and the parameters after two optimiser steps).

Selection (which tokens Lp-Reg regularises) follows the form:
    released  per micro-batch, as the released code does (the rho-percentile among the
              micro-batch's negative-advantage tokens);
    paper     exact over the whole generation batch, across gradient-accumulation steps and
              ranks: when a generation batch is made, one no-grad forward gives every
              completion token's log-prob and `lpreg.selection_threshold` (two all_gathers)
              fixes the step-wide threshold, applied later to each micro-batch's tokens.

The loss runs through the wrapped model's forward (TRL's `_ForwardRedirection`, as its
distillation trainer does), so DDP, FSDP and ZeRO-3 still synchronise gradients. Metrics are
logged the way TRL logs its own: `lpreg/kl`, `lpreg/frac`, `lpreg/threshold`, plus `entropy`
and `clip_ratio/*` (means over every process).

This touches TRL internals (`_compute_loss`, `_prepare_inputs`, `_buffered_inputs`,
`_metrics`, `_get_per_token_logps_and_entropies`'s inputs), hence the pinned range below.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import trl
from packaging.version import Version
from torch import Tensor
from trl import GRPOConfig, GRPOTrainer
from trl.models.utils import _ForwardRedirection

from .._validate import check_mode_threshold
from ..fused_linear import fused_linear_token_stats
from ..loss_config import COMPATS
from ..policy_loss import policy_loss_from_stats
from ..selection import SelectionThreshold, selection_threshold
from ..token_stats import TokenStats, lpreg_token_stats

TRL_RANGE = (Version("1.16"), Version("1.17"))
if not (TRL_RANGE[0] <= Version(trl.__version__) < TRL_RANGE[1]):
    raise ImportError(f"lpreg.integrations.trl is tested with trl >= {TRL_RANGE[0]}, < {TRL_RANGE[1]} (it overrides "
                      f"private members of GRPOTrainer), got trl {trl.__version__}; pip install 'lpreg[trl]'")

SUPPORTED_LOSS_TYPES = ("dapo", "bnpo", "grpo", "dr_grpo")
_AGG = {"dapo": "token-mean", "bnpo": "token-mean", "grpo": "seq-mean-token-mean", "dr_grpo": "seq-mean-token-sum"}
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                    "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")
_OLD_KEY = "lpreg_old_logps"  # (B, C) no-grad log-probs of the generation batch (paper selection only)
_SEL_KEY = "lpreg_selection"  # SelectionThreshold of one micro-batch


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
    lpreg_fused: bool = field(default=True, metadata={
        "help": "Statistics from hidden states and the output-embedding weight, chunk by chunk, without the "
                "(B, C, V) logits; False: from the model's own logits."})
    lpreg_chunk_size: Optional[int] = field(default=None, metadata={
        "help": "Token rows per chunk of the fused path (None: about 16 MiB of fp32 logits on CPU, 128 MiB on CUDA)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lpreg_compat not in COMPATS:
            raise ValueError(f"lpreg_compat must be one of {COMPATS}, got {self.lpreg_compat!r}")
        check_mode_threshold(self.lpreg_mode, self.lpreg_threshold)
        if not (0 < float(self.lpreg_rho) <= 1):
            raise ValueError(f"lpreg_rho must be in (0, 1], got {self.lpreg_rho!r}")
        if not (0 <= float(self.lpreg_beta) < float("inf")):
            raise ValueError(f"lpreg_beta must be a finite number >= 0, got {self.lpreg_beta!r}")
        if self.lpreg_chunk_size is not None and (not isinstance(self.lpreg_chunk_size, int)
                                                  or self.lpreg_chunk_size < 1):
            raise ValueError(f"lpreg_chunk_size must be None or an int >= 1, got {self.lpreg_chunk_size!r}")


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
        ("entropy_coef", args.entropy_coef != 0.0, "0.0"),
        ("use_adaptive_entropy", bool(args.use_adaptive_entropy), "False"),
    ]
    for name, bad, want in unsupported:
        if bad:
            raise ValueError(f"{name}={getattr(args, name)!r} is not supported by LpRegGRPOTrainer; set {name}={want}")


def check_model(args: "LpRegGRPOConfig", model_config) -> None:
    """Raise ValueError for model features this trainer does not implement."""
    text = model_config.get_text_config()
    if getattr(text, "output_router_logits", False) and (args.router_aux_loss_coef or 0.0) != 0.0:
        raise ValueError(f"router_aux_loss_coef={args.router_aux_loss_coef!r} (MoE load-balancing loss) is not "
                         "supported by LpRegGRPOTrainer; set router_aux_loss_coef=0.0")
    if args.lpreg_fused:
        for name in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling"):
            if getattr(text, name, None) not in (None, 1.0):
                raise ValueError(f"lpreg_fused=True needs plain logits = hidden @ W.T; this model sets "
                                 f"{name}={getattr(text, name)!r}: use lpreg_fused=False")


class LpRegGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose policy loss is Lp-Reg (see the module docstring)."""

    def __init__(self, model: Any, reward_funcs: Any = None, args: Optional[LpRegGRPOConfig] = None,
                 **kwargs: Any) -> None:
        check_args(args)  # before TRL builds anything (e.g. a reference model for beta != 0)
        super().__init__(model, reward_funcs, args, **kwargs)
        check_model(self.args, self.model.config)
        self._lpreg_redirect = _ForwardRedirection()

    # ---- per-token statistics: one forward of the wrapped model

    def _lpreg_stats(self, unwrapped, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> TokenStats:
        """TokenStats (B, C) of the completion `labels` (B, C; -100 where masked)."""
        a = self.args
        C = labels.shape[1]
        opts = dict(temperature=self.temperature, mode=a.lpreg_mode, threshold=a.lpreg_threshold)
        base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
        with self.accelerator.autocast():
            if not a.lpreg_fused:
                # logits_to_keep = C + 1: position i predicts token i + 1, so the last C + 1 positions
                # hold the predictions of the C completion tokens (and one past the end, dropped)
                out = unwrapped(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=C + 1,
                                use_cache=False)
                return lpreg_token_stats(out.logits[:, :-1], labels, **opts)
            hidden = base.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                     use_cache=False).last_hidden_state[:, -C - 1:-1]
        head = base.get_output_embeddings()
        # FSDP2 shards parameters as DTensors; the hidden states are plain tensors (as in TRL's head)
        full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
        weight, bias = full(head.weight), None if head.bias is None else full(head.bias)
        return fused_linear_token_stats(hidden.to(weight.dtype), weight, labels, bias=bias,
                                        chunk_size=a.lpreg_chunk_size, **opts)

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

    # ---- paper form: the step-wide selection, once per generation batch

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if self.args.lpreg_compat == "paper" and self.model.training and out.get("old_per_token_logps") is None:
            out[_OLD_KEY] = self._lpreg_old_logps(out)
        return out

    @torch.no_grad()
    def _lpreg_old_logps(self, batch: Dict[str, Any]) -> Tensor:
        """(B, C) log-probs of the whole generation batch, per_device_train_batch_size rows at a time
        (the micro-batch size the loss will see, so the same kernels produce the same values)."""
        input_ids, attention_mask, _, labels = self._lpreg_inputs(batch)
        unwrapped = self.accelerator.unwrap_model(self.model)
        step = self.args.per_device_train_batch_size
        rows = [slice(i, i + step) for i in range(0, input_ids.shape[0], step)]
        parts = [self._lpreg_stats(unwrapped, input_ids[r], attention_mask[r], labels[r]).logp for r in rows]
        return torch.cat(parts).float()

    def _prepare_inputs(self, generation_batch):
        before = self._buffered_inputs
        out = super()._prepare_inputs(generation_batch)
        batches: Optional[List[Dict[str, Any]]] = self._buffered_inputs
        if self.args.lpreg_compat == "paper" and self.model.training and batches is not before:
            # a new generation batch: one threshold for all of its micro-batches on every rank
            olds = [b.get("old_per_token_logps", b.get(_OLD_KEY)) for b in batches]
            masks = [self._lpreg_inputs(b)[2] for b in batches]
            sels = selection_threshold(olds, masks, rho=self.args.lpreg_rho)
            for b, s in zip(batches, sels):
                b[_SEL_KEY] = s
        return out

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
        unwrapped = self.accelerator.unwrap_model(model)
        # through the wrapper's forward: DDP / FSDP / ZeRO-3 see a forward and sync gradients
        stats = self._lpreg_redirect(model, unwrapped, self._lpreg_stats, unwrapped, input_ids, attention_mask, labels)
        adv = inputs["advantages"]
        adv = adv[:, None] if adv.dim() == 1 else adv
        if inputs.get("importance_sampling_ratio") is not None and self.use_vllm \
                and self.vllm_importance_sampling_correction:
            # TRL multiplies the clipped surrogate by the (detached, positive) rollout-correction
            # weight w; -min(rA, clip(r)A) w = -min(r(Aw), clip(r)(Aw)), so fold w into A (sign kept)
            adv = adv * inputs["importance_sampling_ratio"]
        adv = adv.expand_as(mask).float()
        old = inputs.get("old_per_token_logps")  # None: on-policy, ratio exactly 1 (as TRL)
        sel: Optional[SelectionThreshold] = inputs.get(_SEL_KEY) if mode == "train" else None
        agg, num_tokens, divisor = self._normalisation(inputs, mode)
        loss, m = policy_loss_from_stats(
            stats, adv, old, mask, compat=a.lpreg_compat, rho=a.lpreg_rho, beta=a.lpreg_beta,
            clip_low=self.epsilon_low, clip_high=self.epsilon_high, loss_agg_mode=agg,
            selection_threshold=sel, num_tokens=num_tokens, return_tensors=True)
        self._lpreg_log(mode, stats, old, adv, mask, m)
        return loss / divisor

    def _lpreg_log(self, mode: str, stats: TokenStats, old: Optional[Tensor], adv: Tensor, mask: Tensor,
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
        metrics["lpreg/kl"].append((tot[4] / tot[5].clamp(min=1.0)).item())
        metrics["lpreg/frac"].append((tot[5] / count).item())
        metrics["lpreg/threshold"].append((tot[7] / self.accelerator.num_processes).item())
