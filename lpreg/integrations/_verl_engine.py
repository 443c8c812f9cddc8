"""lpreg's verl FSDP language-model engine: verl's `FSDPEngineWithLMHead` whose per-token outputs
are lpreg's statistics whenever the loss is `lpreg_ppo_loss` or the batch asks for a rollout proxy.

Per micro-batch, in the layout verl's engine uses (packed rows of every sequence, the label of
row i being token i + 1; Ulysses ranks hold slices and are gathered as verl gathers its
log-probs):
- logits path (use_fused_kernels=False): the logits the model returned, divided by verl's
  per-token temperature, -> `lpreg_token_stats` (or `sparse_proxy_stats` against the rollout's
  sparse proxy), one fused pass in place of verl's log-softmax + entropy;
- fused path (use_fused_kernels=True): verl's fused forward would return log-probs only, so
  the model's forward is redirected (inside the FSDP root's forward, which unshards it) to the
  backbone's hidden states and `lpreg.fused_linear_token_stats` on the LM head, never the
  (rows, V) logits, with the model's logit transform (`lpreg.logit_transform_from_config`:
  Gemma's soft cap, Cohere / Granite / MiniCPM scales; CONTRACT A) passed as logit_scale /
  logit_softcap. The head's matmul runs in the compute dtype of verl's mixed-precision policy
  (mixed_precision.param_dtype, bf16 by default; fp32 accumulation), or in fp32 when the policy
  loss sets lpreg_fp32_head=True (an fp32 matmul over the policy's head weights). verl wraps an
  untied LM head as its own FSDP2 unit, whose forward never runs here: `head_weights` has FSDP2
  unshard it (its own all-gather, in the policy's param dtype) and FSDP2's root post-backward
  reduce-scatters its gradient (the policy's reduce dtype, averaged over the data-parallel mesh)
  and reshards it, so every rank updates its shard from the whole batch. A LoRA model (peft) runs
  its adapted backbone;
- the old-log-prob pass with a rollout-proxy request (`lpreg_record`, set by the driver): the
  old log-probs and entropies of every row (verl's layout), and the proxy record
  (lpreg.integrations._proxy) of the response tokens only, as jagged tensors of the responses'
  lengths (old_log_probs' layout in the trainer): the worker's output is the record the update
  reads, with no prompt rows, no padding and no rearranging on the driver.
"""

import functools
import json
from contextlib import contextmanager
from typing import Any, Dict, Optional, Tuple, cast

import torch
from torch import Tensor
from verl.utils import tensordict_utils as tu
from verl.workers.engine import EngineRegistry
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead
from verl.workers.engine.utils import prepare_micro_batches
from verl.workers.utils import losses as verl_losses

from .. import needs_step_selection
from ..fused_linear import fused_linear_token_stats
from ..logit_transform import LogitTransform, logit_transform_from_config
from ..selection import selection_threshold
from ..sparse_proxy import SparseProxy, sparse_proxy_stats
from ..token_stats import TokenStats, lpreg_token_stats
from . import _proxy
from ._core import loss_config
from ._verl_config import is_lpreg, lpreg_options
from ._verl_loss import STAT_KEYS, lpreg_ppo_loss, pool_mechanism_metrics

RECORD_KEY = "lpreg_record"  # non-tensor batch entry: JSON of the record the old-log-prob pass makes
_UNSUPPORTED = ("distillation_use_topk", "calculate_sum_pi_squared")
_RECORD_FIELDS = (_proxy.ROLLOUT_LOGQ, *_proxy.SPARSE_KEYS)  # output in the responses' layout


def loss_actor_config(loss_function) -> Optional[Any]:
    """The ActorConfig when `loss_function` is verl's ppo_loss (or ours) in loss mode lpreg."""
    if not isinstance(loss_function, functools.partial):
        return None
    if loss_function.func not in (verl_losses.ppo_loss, lpreg_ppo_loss):
        return None
    config = loss_function.keywords.get("config")
    return config if config is not None and is_lpreg(config) else None


def record_spec(policy_loss) -> str:
    """The old-log-prob pass's request for a rollout proxy (JSON, a non-tensor batch entry)."""
    o = lpreg_options(policy_loss)
    sparse = loss_config(o).kl_estimator == "full"  # the full KL reads q over K: the sparse record
    return json.dumps({"mode": o["lpreg_mode"], "threshold": float(o["lpreg_threshold"]), "sparse": sparse,
                       "topk": int(o["lpreg_proxy_topk"]), "fp32_head": fp32_head(policy_loss)})


def fp32_head(policy_loss) -> bool:
    """Whether the policy loss asks for the fused head's matmul in fp32 (`lpreg_fp32_head`, as TRL's
    cast_lm_head_to_fp32) rather than in the mixed-precision policy's compute dtype."""
    get = policy_loss.get if hasattr(policy_loss, "get") else lambda k, d: getattr(policy_loss, k, d)
    return bool(get("lpreg_fp32_head", False))


def transform_kwargs(transform: LogitTransform) -> Dict[str, Any]:
    """The fused functions' logit_scale / logit_softcap keywords of `transform` (none for the identity)."""
    if transform.is_identity:
        return {}
    return {"logit_scale": transform.scale, "logit_softcap": transform.softcap}


def _full(t: Optional[Tensor]) -> Optional[Tensor]:
    """A DTensor of activations (tensor-parallel logits) as a full tensor: every rank holds the same
    values, so the gradient of the gathered tensor is the same on every rank (a local slice is right)."""
    return t.full_tensor() if t is not None and hasattr(t, "full_tensor") else t


def gathered_param(t: Optional[Tensor], dtype: Optional[torch.dtype] = None,
                   reduce_dtype: torch.dtype = torch.float32) -> Optional[Tensor]:
    """A parameter's FSDP2 DTensor shard, all-gathered in `dtype` for a forward its own FSDP unit does
    not run (None: the shard's dtype).

    As FSDP2's unshard: the shard is cast to the compute dtype before the all-gather (V x H x 2 bytes
    in bf16, not the fp32 master's x 4), and the gradient is reduce-scattered in `reduce_dtype`.
    Each data-parallel rank's gradient of the gathered weight comes from its own data only, so the
    backward must reduce it across ranks, as FSDP2's reduce-scatter would: `Partial("avg")`, the
    average over every mesh dimension (FSDP2 divides by the data-parallel size, and verl scales the
    loss by it). A Replicate gradient redistributed to Shard (full_tensor()'s default) would be a
    local slice, no collective, leaving every rank's shard trained on its own data. A plain tensor
    (an unsharded parameter: a tied head, inside the root's unshard) is only cast."""
    if t is None:
        return t
    if not hasattr(t, "full_tensor"):
        return t if dtype is None else t.to(dtype)
    from torch.distributed.tensor import DTensor, Partial, Replicate

    shard = cast(DTensor, t)  # an FSDP2 shard: a DTensor
    ndim = shard.device_mesh.ndim
    full = shard.redistribute(shard.device_mesh, [Replicate()] * ndim, forward_dtype=dtype or shard.dtype,
                              backward_dtype=reduce_dtype)
    return full.to_local(grad_placements=[Partial("avg")] * ndim)


def head_weights(head, dtype: torch.dtype, reduce_dtype: torch.dtype):
    """(weight, bias, own_unit) of the LM head for the fused matmul, in `dtype`.

    An untied head that verl wrapped as its own FSDP2 unit (an FSDPModule whose forward the fused
    path does not run) is unsharded by FSDP2 itself (`head.unshard()`): one all-gather in the
    mixed-precision policy's param dtype, exactly FSDP2's own; its parameters are then the unsharded
    ones, whose gradients the root's post-backward callback reduce-scatters (in the policy's reduce
    dtype, averaged over the data-parallel ranks) and reshards, as for a unit whose forward ran
    (and its gradient-accumulation state stays FSDP2's: micro-batches without gradient sync keep the
    unsharded gradient). A head with DTensor parameters outside an FSDP unit is gathered by
    `gathered_param`; a plain one (a tied head, inside the root's unshard) is used as is. `dtype`
    other than the parameters' (lpreg_fp32_head=True: fp32) casts for the matmul only."""
    own_unit = hasattr(head, "unshard") and hasattr(head, "reshard")
    if own_unit:
        head.unshard()
    weight = head.weight if own_unit else gathered_param(head.weight, dtype, reduce_dtype)
    bias = getattr(head, "bias", None)
    bias = bias if own_unit or bias is None else gathered_param(bias, dtype, reduce_dtype)
    cast = (lambda t: t if t is None or t.dtype == dtype else t.to(dtype))  # noqa: E731
    return cast(weight), cast(bias), own_unit


def lm_parts(inner):
    """(backbone, LM head) of verl's model: a causal LM, or a peft model around one (verl's LoRA:
    the backbone's layers carry the adapters; the head must not)."""
    model = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # peft -> the causal LM
    head = model.get_output_embeddings()
    if head is None or any(hasattr(head, a) for a in ("lora_A", "lora_embedding_A", "base_layer", "modules_to_save")):
        raise NotImplementedError(
            f"use_fused_kernels=True with loss_mode=lpreg reads the LM head's weight; this model's head is "
            f"{type(head).__name__} (a peft-wrapped head: keep lm_head out of the LoRA target_modules and "
            f"modules_to_save, or set actor_rollout_ref.model.use_fused_kernels=False)")
    return model.base_model, head


def _lengths(micro_batch):
    """(prompt lengths, response lengths) of a micro-batch, (B,) int64 each: from the nested prompts /
    responses (v1), or the attention mask of the padded ones (RayPPOTrainer)."""
    prompts, responses = micro_batch["prompts"], micro_batch["responses"]
    if prompts.is_nested:
        return prompts.offsets().diff(), responses.offsets().diff()
    mask = micro_batch["attention_mask"]
    return mask[:, :prompts.shape[1]].sum(1), mask[:, prompts.shape[1]:].sum(1)


def response_index(micro_batch) -> Tuple[Tensor, Tensor]:
    """(rows, offsets): for every response token in order, the packed model row that predicts it
    (response token j of sequence b, b's rows ending at end_b: row end_b - len_b - 1 + j), (T,) int64,
    and the responses' offsets (B + 1,). No Python loop over sequences: T = sum of response lengths."""
    p_lens, r_lens = _lengths(micro_batch)
    r_lens = r_lens.to(torch.long)
    ends = (p_lens + r_lens).cumsum(0)
    offsets = torch.zeros(r_lens.numel() + 1, dtype=torch.long, device=r_lens.device)
    offsets[1:] = r_lens.cumsum(0)
    first = torch.repeat_interleave(ends - r_lens - 1 - offsets[:-1], r_lens)  # row of token j minus j
    return first + torch.arange(int(offsets[-1]), device=r_lens.device), offsets


def to_response_layout(rows: Tensor, micro_batch) -> Tensor:
    """(n_rows, *) values of the packed rows -> a jagged (B, len_b, *) tensor of the response tokens."""
    index, offsets = response_index(micro_batch)
    return torch.nested.nested_tensor_from_jagged(rows[index.to(rows.device)], offsets.to(rows.device))


def response_rows(micro_batch, stored: Tensor, n_rows: int, filler: Tensor) -> Tensor:
    """Per-response-token values, jagged (B, len_b, *) (v1) or padded (B, R, *) (RayPPOTrainer's
    batch), -> (n_rows, *) in the engine's packed row layout (the inverse of `to_response_layout`);
    rows that predict no response token get `filler`. One gather and one scatter, no Python loop."""
    index, offsets = response_index(micro_batch)
    if stored.is_nested:
        values = stored.values()
    else:  # padded: token j of sequence b is stored[b, j]
        seq = torch.repeat_interleave(torch.arange(offsets.numel() - 1, device=offsets.device), offsets.diff())
        values = stored[seq.to(stored.device), (torch.arange(int(offsets[-1]), device=offsets.device)
                                                 - offsets[:-1][seq]).to(stored.device)]
    out = filler.to(values).expand(n_rows, *filler.shape).clone()
    out[index.to(out.device)] = values.to(out)
    return out


def sparse_rows(micro_batch, n_rows: int) -> Optional[SparseProxy]:
    """The rollout's sparse proxy of a micro-batch in packed rows (None without one)."""
    if _proxy.SPARSE_KEYS[0] not in micro_batch.keys():
        return None
    # rows that predict no response token get the first recorded entry: a valid proxy, never read
    rows = []
    for k in (*_proxy.SPARSE_KEYS, _proxy.ROLLOUT_LOGQ):
        t = micro_batch[k]
        first = t.values()[0] if t.is_nested else t[0, 0]
        rows.append(response_rows(micro_batch, t, n_rows, first))
    return SparseProxy(rows[0], rows[1].float(), rows[2].float(), rows[3].float())


def packed(t: Tensor, micro_batch) -> Tensor:
    """(bsz, max_len, *) padded model rows -> (total_nnz, *) in sequence order."""
    lengths = micro_batch["input_ids"].offsets().diff().tolist()
    return torch.cat([t[b, :n] for b, n in enumerate(lengths)])


class _Unhooked:
    """A causal LM that is the FSDP root, called through its class's forward (no FSDP2 root hooks):
    what `check_fused_head` reads of a model (call, get_output_embeddings, base_model)."""

    def __init__(self, model):
        self._model = model

    def __call__(self, **kwargs):
        return type(self._model).forward(self._model, **kwargs)

    def get_output_embeddings(self):
        return self._model.get_output_embeddings()

    @property
    def base_model(self):
        return self._model.base_model

    @property
    def lpreg_model_name(self) -> str:
        """The model's own class name (FSDP2 wraps it in a subclass named FSDP<name>), for the guard's error."""
        return next(c.__name__ for c in type(self._model).__mro__ if not c.__name__.startswith("FSDP"))


class LpRegFSDPEngineWithLMHead(FSDPEngineWithLMHead):
    """verl's FSDP LM engine; with loss_mode=lpreg its outputs and loss are lpreg's."""

    _lpreg_selections = None
    _lpreg_head_checked = False

    # ---- one optimiser step: the paper form's step-wide selection first

    def forward_backward_batch(self, data, loss_function, forward_only=False):
        config = loss_actor_config(loss_function)
        if config is None or forward_only:
            return super().forward_backward_batch(data, loss_function, forward_only)
        o = lpreg_options(config.policy_loss)
        self._lpreg_selections = None
        if needs_step_selection(o["lpreg_compat"]):
            # the same split the base class is about to make (a deterministic function of data)
            tu.assign_non_tensor(data, sp_size=self.ulysses_sequence_parallel_size)
            micro, _ = prepare_micro_batches(data=data, dp_group=self.get_data_parallel_group(),
                                             same_micro_num_in_dp=True)
            keys = [k for k in ("old_log_probs", "response_mask", "rollout_is_weights") if k in data.keys()]
            padded = [mb.select(*keys).to_padded_tensor() for mb in micro]
            # the pool: tokens trained on (rollout-correction weight w > 0, as in the TRL adapter)
            pools = [p["response_mask"] * (p["rollout_is_weights"] > 0) if "rollout_is_weights" in p.keys()
                     else p["response_mask"] for p in padded]
            self._lpreg_selections = list(selection_threshold(
                [p["old_log_probs"] for p in padded], pools, rho=o["lpreg_rho"],
                group=self.get_data_parallel_group()))
        try:
            out = super().forward_backward_batch(data, functools.partial(lpreg_ppo_loss, config=config),
                                                 forward_only)
        finally:
            self._lpreg_selections = None
        # the mechanism metrics, exact over the micro-batches and data-parallel ranks (a collective)
        pool_mechanism_metrics(out["metrics"], group=self.get_data_parallel_group())
        return out

    # ---- one micro-batch

    def forward_step(self, micro_batch, loss_function, forward_only):
        config = loss_actor_config(loss_function)
        record = tu.get_non_tensor_data(data=micro_batch, key=RECORD_KEY, default=None)
        if config is not None and self._lpreg_selections:
            loss_function = functools.partial(loss_function, selection=self._lpreg_selections.pop(0))
        fused = tu.get_non_tensor_data(data=micro_batch, key="use_fused_kernels", default=False)
        if fused and (config is not None or record is not None):
            with self._lpreg_fused_forward(micro_batch, config, record):
                return super().forward_step(micro_batch, loss_function, forward_only)
        return super().forward_step(micro_batch, loss_function, forward_only)

    @contextmanager
    def _lpreg_fused_forward(self, micro_batch, config, record):
        """Redirect the model's forward (called by the FSDP root's forward, whose hooks unshard it)
        to backbone hidden states -> lpreg statistics or the rollout record, chunk by chunk."""
        inner = getattr(self.module, "_fsdp_wrapped_module", self.module)
        backbone, head = lm_parts(inner)
        opts = self._lpreg_opts(config, record)
        opts["transform"] = logit_transform_from_config(getattr(inner, "config", None))
        dtype, reduce_dtype = self._lpreg_head_dtypes(opts["fp32_head"])
        rmpad = tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True)

        def forward(input_ids=None, attention_mask=None, position_ids=None, temperature=1.0, shift_labels=None,
                    return_dict=True, use_cache=False, **extra):
            if any(v is not None for v in extra.values()):
                raise NotImplementedError(f"use_fused_kernels with loss_mode=lpreg takes text inputs only, got "
                                          f"{sorted(k for k, v in extra.items() if v is not None)}")
            if not self._lpreg_head_checked:
                self._lpreg_guard(inner, input_ids, opts["transform"], float(temperature))
            hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False).last_hidden_state
            if rmpad:
                hidden, labels = hidden[0], shift_labels[0]
            else:  # padded rows -> packed rows; labels: each sequence's next tokens (verl's roll)
                hidden = packed(hidden, micro_batch.to(hidden.device))
                labels = torch.roll(micro_batch["input_ids"].values().to(hidden.device), shifts=-1, dims=0)
            weight, bias, own_unit = head_weights(head, dtype, reduce_dtype)
            rows = self._lpreg_rows(hidden, weight, bias, labels, float(temperature), opts, micro_batch, record)
            if own_unit and not torch.is_grad_enabled():
                head.reshard()  # no backward will (the old-log-prob pass)
            # a dict: FSDP2 finds the output tensors (a pytree) and unshards the root again before
            # their backward, which re-reads the LM head
            return {"lpreg": rows}

        inner.forward = forward
        try:
            yield
        finally:
            del inner.forward

    def _lpreg_guard(self, inner, input_ids, transform, temperature) -> None:
        """Once per engine, before the first fused step: the head guard (`_head_guard.check_fused_head`,
        CONTRACT B) on the first 64 tokens of this micro-batch, with the model's own forward. It runs
        inside the FSDP root's forward (parameters unsharded); the root's forward is called through
        its class (`_Unhooked`), so FSDP2's hooks on the root do not reshard it mid-forward (its
        other units unshard and reshard themselves as usual). Under a half-precision mixed-precision
        policy the model multiplies in that dtype behind fp32 master weights: the guard is told
        (compute_dtype), so its tolerance is that dtype's."""
        self._lpreg_head_checked = True
        compute, _ = self._lpreg_head_dtypes(False)
        from ._head_guard import check_fused_head

        ids = input_ids[:1, :64]
        model = inner if hasattr(inner, "get_base_model") else _Unhooked(inner)  # peft: its LM is not the root
        check_fused_head(model, ids, torch.ones_like(ids), transform, temperature=temperature, compute_dtype=compute)

    def _lpreg_opts(self, config, record) -> Dict[str, Any]:
        if record is not None:
            return json.loads(record)  # record_spec's keys: mode, threshold, sparse, topk, fp32_head
        o = lpreg_options(config.policy_loss)
        return {"mode": o["lpreg_mode"], "threshold": o["lpreg_threshold"], "sparse": False, "topk": 0,
                "fp32_head": fp32_head(config.policy_loss)}

    def _lpreg_head_dtypes(self, want_fp32: bool):
        """(compute dtype, gradient-reduction dtype) of the fused head: those of verl's mixed-precision
        policy (mixed_precision.param_dtype / reduce_dtype: bf16 / fp32 by default), fp32 compute with
        lpreg_fp32_head=True."""
        from verl.utils.torch_dtypes import PrecisionType

        mp = getattr(self.engine_config, "mixed_precision", None) or {}
        get = mp.get if hasattr(mp, "get") else lambda k, d: getattr(mp, k, d)
        compute = getattr(self, "_autocast_dtype", None) or PrecisionType.to_dtype(get("param_dtype", "bf16"))
        reduce = PrecisionType.to_dtype(get("reduce_dtype", "fp32"))
        return (torch.float32 if want_fp32 else compute), reduce

    def _lpreg_rows(self, hidden, weight, bias, labels, temperature, opts, micro_batch, record):
        """Fused: TokenStats of the rows (training), or the rollout record (old-log-prob pass)."""
        if record is None:
            # a sparse proxy carries its own filter: fused_linear_token_stats then ignores mode / threshold
            return fused_linear_token_stats(hidden.to(weight.dtype), weight, labels, bias=bias,
                                            proxy=sparse_rows(micro_batch, hidden.shape[0]), temperature=temperature,
                                            mode=opts["mode"], threshold=opts["threshold"],
                                            **transform_kwargs(opts["transform"]))
        return _proxy.record_hidden(hidden.to(weight.dtype), weight, bias, labels, chunk_size=None,
                                    temperature=temperature, mode=opts["mode"], threshold=opts["threshold"],
                                    sparse=opts["sparse"], topk=opts["topk"], transform=opts["transform"])

    # ---- per-token outputs

    def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
        config = loss_actor_config(logits_processor_func)
        record = tu.get_non_tensor_data(data=micro_batch, key=RECORD_KEY, default=None)
        if config is None and record is None:
            return super().prepare_model_outputs(output, output_args, micro_batch, logits_processor_func)
        get = functools.partial(tu.get_non_tensor_data, data=micro_batch)
        for key in _UNSUPPORTED:
            if get(key=key, default=False):
                raise NotImplementedError(f"{key}=True is not supported with loss_mode=lpreg")
        rmpad = get(key="use_remove_padding", default=True)
        if get(key="use_fused_kernels", default=False):
            rows = output["lpreg"]  # computed in the redirected forward
        else:
            rows = self._lpreg_logits_rows(output, output_args, micro_batch, config, record, rmpad)
        if isinstance(rows, TokenStats):
            names, values = STAT_KEYS, list(rows)
        else:
            names = ["log_probs", _proxy.ROLLOUT_LOGQ, *(_proxy.SPARSE_KEYS if _proxy.SPARSE_KEYS[0] in rows else ())]
            values = [rows["logp"], *(rows[k] for k in names[1:])]
            if get(key="calculate_entropy", default=False):
                names, values = [*names, "entropy"], [*values, rows["entropy"]]
        if rmpad:  # gather across Ulysses ranks, drop the pad
            values = [self._gather_and_unpad_packed(t, output_args["pad_size"]) for t in values]
        cu_seqlens = micro_batch["input_ids"].offsets()
        out = {k: (to_response_layout(v, micro_batch) if k in _RECORD_FIELDS
                   else torch.nested.nested_tensor_from_jagged(v, cu_seqlens)) for k, v in zip(names, values)}
        if isinstance(rows, TokenStats) and get(key="calculate_entropy", default=False):
            out["entropy"] = out["lpreg_entropy"]
        return out

    def _lpreg_logits_rows(self, output, output_args, micro_batch, config, record, rmpad):
        if rmpad:
            logits = output.logits.squeeze(0)  # (total_nnz [/ sp + pad], V)
            temperature = output_args["temperature_rmpad"].reshape(-1, 1)
        else:
            logits = packed(output.logits, micro_batch)
            lengths = micro_batch["input_ids"].offsets().diff().to(logits.device)
            temperature = output_args["temperature"].float().repeat_interleave(lengths)[:, None]
        logits = _full(logits)  # tensor parallel: logits sharded on the vocabulary
        if not output_args.get("temperature_is_one", False):
            logits = logits / temperature.to(logits.device)  # per-token temperature, as verl applies it
        labels = output_args["input_ids_rmpad_rolled"].reshape(-1)
        opts = self._lpreg_opts(config, record)
        if record is not None:
            return _proxy.record(logits, labels, temperature=1.0, mode=opts["mode"], threshold=opts["threshold"],
                                 sparse=opts["sparse"], topk=opts["topk"])
        proxy = sparse_rows(micro_batch, logits.shape[0])
        if proxy is not None:
            return sparse_proxy_stats(logits, labels, proxy, temperature=1.0)
        return lpreg_token_stats(logits, labels, temperature=1.0, mode=opts["mode"], threshold=opts["threshold"])


def install_engine() -> None:
    """Point every registry entry of verl's FSDP LM engine at the lpreg subclass (a no-op unless
    loss_mode=lpreg or a rollout-proxy request), for the devices verl registered and for CPU."""
    for backend, by_device in EngineRegistry._engines.get("language_model", {}).items():
        for key, cls in list(by_device.items()):
            if cls is FSDPEngineWithLMHead:
                by_device[key] = LpRegFSDPEngineWithLMHead
        if backend in ("fsdp", "fsdp2"):
            by_device.setdefault("cpu", LpRegFSDPEngineWithLMHead)
