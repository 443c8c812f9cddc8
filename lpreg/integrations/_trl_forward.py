"""One forward of a TRL policy model -> lpreg's per-token statistics of the completion tokens.

Called inside the wrapped model's forward (TRL's `_ForwardRedirection`), so that DDP, FSDP2
and DeepSpeed ZeRO-3 see a forward of the root module: FSDP2 unshards the root's parameters
(the embedding, an untied head) and ZeRO-3 arms its gradient hooks. The redirection replaces the
forward that accelerate wrapped in autocast, so the trainer runs these functions inside
`accelerator.autocast()` itself, as TRL runs its own forwards (bf16 / fp16 mixed precision); the
fused head's chunk products keep their own precision there (fp32 logits, lpreg._fused_linear_chunks).

Two paths, as in `LpRegGRPOConfig.lpreg_fused`:
    fused     backbone -> hidden states h (B, C, H); statistics of h W^T + b chunk by chunk
              (`lpreg.fused_linear_token_stats`), never the (B, C, V) logits
    logits    the model's own forward with logits_to_keep = C + 1, then `lpreg_token_stats`
              (or `sparse_proxy_stats` against a rollout-time sparse proxy)

The LM head, as each sharding strategy presents it inside the root's forward:
- FSDP2 (accelerate 1.16, `fsdp2_prepare_model`): each auto-wrapped block (the decoder layers) is a
  unit, the input embedding another, and the tail `[final norm, lm_head]` one unit together
  (`fully_shard([norm, lm_head], reshard_after_forward=False)`; with tied embeddings the input
  embedding joins that group), the root model last. This module never calls `lm_head`'s forward,
  but the backbone calls the final norm's, whose pre-forward hook unshards the whole group: when
  `lm_head.weight` is read here it is the plain unsharded parameter (no `full_tensor()` runs), its
  gradient accumulates there, and the group's post-backward reduce-scatters it with the norm's
  (averaged over the ranks, like every other parameter's). That grouping is what spares TRL the
  defect verl has with an untied head as a unit of its own: there the weight is still the sharded
  DTensor when it is read, and `full_tensor()`'s backward hands each rank the slice of its own
  (Replicate) gradient with no collective, so each rank would update its head shard from its own
  data only. `check_head_unit` refuses such a layout before the first rollout (a head unit whose
  group holds no backbone module), and `token_stats` refuses any DTensor head whose gradient is
  needed.
- ZeRO-3: the empty partition is gathered for the forward (`maybe_gather_lm_head_ctx`) and
  gathered again for the backward, which recomputes the logits chunk by chunk from the head
  (`_Zero3Gather` below: the same two gathers TRL's ChunkedLogProbFunction makes); DeepSpeed's
  hooks reduce its gradient.
"""

from contextlib import nullcontext
from typing import Any, Dict, Optional, Tuple, TypeVar

import torch
from torch import Tensor
from trl.trainer.utils import maybe_gather_lm_head_ctx

from ..fused_linear import fused_linear_token_stats
from ..logit_transform import LogitTransform
from ..sparse_proxy import SparseProxy, sparse_proxy_stats
from ..token_stats import TokenStats, lpreg_token_stats
from . import _proxy

MaybeTensor = TypeVar("MaybeTensor", bound=Optional[Tensor])  # a tensor stays a tensor, None stays None


def _full(t: MaybeTensor) -> MaybeTensor:
    """A DTensor's whole value, for a no-grad read (the rollout record); the hidden states are plain
    tensors (as in TRL)."""
    return t.full_tensor() if t is not None and hasattr(t, "full_tensor") else t


def _full_for_grad(t: MaybeTensor, name: str) -> MaybeTensor:
    """The head for a forward whose gradient flows back: refused while it is a sharded DTensor (the head
    is its own FSDP2 unit; see the module docstring), whose full_tensor() gradient no rank reduces."""
    if t is None or not hasattr(t, "full_tensor"):
        return t
    if t.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"lpreg_fused=True: the LM head's {name} is a sharded FSDP2 DTensor inside the model's forward, i.e. "
            f"the head is its own FSDP2 unit; full_tensor()'s gradient would not be reduced across ranks. Keep "
            f"lm_head in the root unit (accelerate's transformer-layer auto-wrap policy does) or set lpreg_fused=False")
    return t.full_tensor()  # a frozen head: no gradient to reduce


def _fsdp_group(module: Any) -> Optional[Tuple[Any, ...]]:
    """The modules FSDP2 unshards together with `module` (one `fully_shard([...])` call), or None where this
    torch does not say (a private attribute: the runtime check in `_full_for_grad` still guards)."""
    try:
        return tuple(module._get_fsdp_state()._modules)
    except (AttributeError, AssertionError, TypeError):
        return None


def check_head_unit(model: Any, fused: bool) -> None:
    """Start-up check (before the first rollout): with the fused path, the head must be unsharded when this
    module reads it (see the module docstring): either a parameter of an enclosing unit (the root), or in
    one FSDP2 unit with a backbone module whose forward runs first (accelerate groups it with the final
    norm). A head that is its own unit alone is refused (ValueError naming the setting)."""
    if not fused:
        return
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2: nothing can be wrapped
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if not isinstance(head, FSDPModule) or head is base:
        return
    group = _fsdp_group(head)
    if group is None:
        return
    backbone = set(_backbone(model).modules())
    if not any(m is not head and m in backbone for m in group):
        raise ValueError(
            "lpreg_fused=True reads lm_head.weight inside the model's forward without calling lm_head's forward, but "
            "lm_head is an FSDP2 unit of its own (no backbone module in its group, e.g. a size-based auto-wrap "
            "policy): its weight is still sharded there, and the gradient of its full_tensor() would not be reduced "
            "across ranks. Group lm_head with the final norm (accelerate 1.16's FSDP2 preparation does) or leave it "
            "in the root unit, or set lpreg_fused=False")


class _Zero3Gather:
    """Keeps a ZeRO-3 head gathered while autograd recomputes from it in backward.

    `enter_on_backward` wraps the statistics: its backward (the first to run) gathers the head;
    `exit_on_backward` wraps the hidden states: its backward runs once lpreg's backward has
    produced the hidden-state gradient, i.e. after the last read of the head, and releases it.
    """

    def __init__(self, weight: Tensor, bias: Optional[Tensor]):
        self.params, self.ctx = (weight, bias), None

    def enter(self):
        self.ctx = maybe_gather_lm_head_ctx(*self.params)
        self.ctx.__enter__()

    def exit(self):
        if self.ctx is not None:
            self.ctx.__exit__(None, None, None)
            self.ctx = None


class _EnterOnBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gather, *stats):
        ctx.gather = gather
        ctx.mark_non_differentiable(stats[1])  # proxy_logp is a target
        return tuple(s.view_as(s) for s in stats)

    @staticmethod
    def backward(ctx, *grads):
        ctx.gather.enter()
        return (None, *grads)


class _ExitOnBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gather, hidden):
        ctx.gather = gather
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):
        ctx.gather.exit()
        return None, grad


def _head(model) -> Tuple[Tensor, Optional[Tensor]]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    return head.weight, head.bias


def _backbone(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.base_model


def _moe_aux_loss(model, router_logits, attention_mask: Tensor) -> Tensor:
    """TRL's MoE load-balancing loss of a fused forward (trl.trainer.utils.add_fused_lm_head)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    text = model.config.get_text_config()
    return load_balancing_loss_func(router_logits, text.num_experts, text.num_experts_per_tok, attention_mask)


def _zero3() -> bool:
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def hidden_states(model, input_ids: Tensor, attention_mask: Tensor, C: int, aux: bool):
    """(B, C, H) hidden states predicting the C completion tokens, and the MoE aux loss (or None)."""
    kwargs = {"output_router_logits": True} if aux else {}
    out = _backbone(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    # position i predicts token i + 1: the C positions before the last predict the C completion tokens
    h = out.last_hidden_state[:, -C - 1:-1]
    return h, (_moe_aux_loss(model, out.router_logits, attention_mask) if aux else None)


def token_stats(model, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, *, fused: bool,
                chunk_size: Optional[int], opts: Dict, proxy: Optional[SparseProxy] = None,
                aux: bool = False) -> Tuple[TokenStats, Optional[Tensor]]:
    """TokenStats (B, C) of the completion `labels` (B, C; -100 where masked), and the MoE aux
    loss when `aux`. `proxy`: a rollout-time SparseProxy (B, C, k), else q is the current policy."""
    C = labels.shape[1]
    if not fused:
        kwargs = {"output_router_logits": True} if aux else {}
        # logits_to_keep = C + 1: the last C + 1 positions predict the C completion tokens (and one
        # past the end, dropped)
        out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=C + 1, use_cache=False,
                    **kwargs)
        logits = out.logits[:, :-1]
        if proxy is not None:
            stats = sparse_proxy_stats(logits, labels, proxy, temperature=opts["temperature"])
        else:
            stats = lpreg_token_stats(logits, labels, **opts)
        return stats, (out.aux_loss if aux else None)
    h, aux_loss = hidden_states(model, input_ids, attention_mask, C, aux)
    w, b = _head(model)
    weight, bias = _full_for_grad(w, "weight"), _full_for_grad(b, "bias")
    if not _zero3():
        stats = fused_linear_token_stats(h.to(weight.dtype), weight, labels, bias=bias, proxy=proxy,
                                         chunk_size=chunk_size, **opts)
        return stats, aux_loss
    gather = _Zero3Gather(weight, bias)
    with maybe_gather_lm_head_ctx(weight, bias):
        h = _ExitOnBackward.apply(gather, h)
        stats = fused_linear_token_stats(h.to(weight.dtype), weight, labels, bias=bias, proxy=proxy,
                                         chunk_size=chunk_size, **opts)
        stats = TokenStats(*_EnterOnBackward.apply(gather, *stats))
    return stats, aux_loss


@torch.no_grad()
def rollout_record(model, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, *, fused: bool,
                   chunk_size: Optional[int], opts: Dict, sparse: bool, topk: int,
                   transform: Optional[LogitTransform] = None) -> Dict[str, Tensor]:
    """Old log-probs and the rollout-time proxy record (lpreg.integrations._proxy) of a batch,
    from one no-grad forward; each entry (B, C) or (B, C, k). `transform`: the head's logit transform,
    applied by the fused path (the logits path reads the model's own logits)."""
    B, C = labels.shape
    if not fused:
        out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=C + 1, use_cache=False)
        logits = out.logits[:, :-1]
        rec = _proxy.record(logits.reshape(B * C, -1), labels.reshape(-1), sparse=sparse, topk=topk, **opts)
        return {k: v.reshape(B, C, *v.shape[1:]) for k, v in rec.items()}
    h, _ = hidden_states(model, input_ids, attention_mask, C, False)
    w, b = _head(model)
    weight, bias = _full(w), _full(b)
    with maybe_gather_lm_head_ctx(weight, bias) if _zero3() else nullcontext():
        rec = _proxy.record_hidden(h.reshape(B * C, -1), weight, bias, labels.reshape(-1), chunk_size=chunk_size,
                                   sparse=sparse, topk=topk, transform=transform, **opts)
    return {k: v.reshape(B, C, *v.shape[1:]) for k, v in rec.items()}
