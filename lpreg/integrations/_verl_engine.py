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
  (rows, V) logits. verl wraps an untied LM head as its own FSDP2 unit, whose forward (and so
  its reduce-scatter) never runs here: the head's DTensor shard is all-gathered by
  `gathered_param`, whose backward reduce-scatters the gradient as FSDP2 would (the average
  over the data-parallel mesh), so every rank updates its shard from the whole batch. A LoRA
  model (peft) runs its adapted backbone; models whose logits are not `h @ W.T + b`
  (soft-capped or scaled: Gemma-2/3, Cohere, Granite) are refused (`_verl_config.scaled_logits`);
- the old-log-prob pass with a rollout-proxy request (`lpreg_record`, set by the driver): the
  old log-probs, entropies and the proxy record (lpreg.integrations._proxy) of every row.
"""

import functools
import json
from contextlib import contextmanager
from typing import Any, Dict, Optional, cast

import torch
from torch import Tensor
from verl.utils import tensordict_utils as tu
from verl.workers.engine import EngineRegistry
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead
from verl.workers.engine.utils import prepare_micro_batches
from verl.workers.utils import losses as verl_losses

from .. import needs_step_selection
from ..fused_linear import fused_linear_token_stats
from ..selection import selection_threshold
from ..sparse_proxy import SparseProxy, sparse_proxy_stats
from ..token_stats import TokenStats, lpreg_token_stats
from . import _proxy
from ._core import loss_config
from ._verl_config import is_lpreg, lpreg_options, scaled_logits
from ._verl_loss import STAT_KEYS, lpreg_ppo_loss

RECORD_KEY = "lpreg_record"  # non-tensor batch entry: JSON of the record the old-log-prob pass makes
_UNSUPPORTED = ("distillation_use_topk", "calculate_sum_pi_squared")


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
                       "topk": int(o["lpreg_proxy_topk"])})


def _full(t: Optional[Tensor]) -> Optional[Tensor]:
    """A DTensor of activations (tensor-parallel logits) as a full tensor: every rank holds the same
    values, so the gradient of the gathered tensor is the same on every rank (a local slice is right)."""
    return t.full_tensor() if t is not None and hasattr(t, "full_tensor") else t


def gathered_param(t: Optional[Tensor]) -> Optional[Tensor]:
    """A parameter's FSDP2 DTensor shard, all-gathered for a forward its own FSDP unit does not run.

    Each data-parallel rank's gradient of the gathered weight comes from its own data only, so the
    backward must reduce it across ranks, as FSDP2's reduce-scatter would: `Partial("avg")`, the
    average over every mesh dimension (FSDP2 divides by the data-parallel size, and verl scales the
    loss by it). `full_tensor()`'s default (a Replicate gradient redistributed to Shard: a local
    slice, no collective) would leave every rank's shard trained on its own data. A plain tensor
    (an unsharded parameter: a tied head, inside the root's unshard) is returned as is."""
    if t is None or not hasattr(t, "full_tensor"):
        return t
    from torch.distributed.tensor import DTensor, Partial

    shard = cast(DTensor, t)  # an FSDP2 shard: a DTensor
    return shard.full_tensor(grad_placements=[Partial("avg")] * shard.device_mesh.ndim)


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


def response_rows(micro_batch, padded: Tensor, n_rows: int, filler: Tensor) -> Tensor:
    """(B, R, *) per-response-token values -> (n_rows, *) in the engine's packed row layout (the
    inverse of verl's no_padding_2_padding: response token j of sequence b is predicted by row
    offset_b - len_b - 1 + j); rows that predict no response token get `filler`."""
    prompts, responses = micro_batch["prompts"], micro_batch["responses"]
    if prompts.is_nested:
        p_lens, r_lens = prompts.offsets().diff(), responses.offsets().diff()
    else:
        mask = micro_batch["attention_mask"]
        p_lens, r_lens = mask[:, :prompts.shape[1]].sum(1), mask[:, prompts.shape[1]:].sum(1)
    ends = (p_lens + r_lens).cumsum(0)
    out = filler.expand(n_rows, *filler.shape).clone()
    for b, (r, end) in enumerate(zip(r_lens.tolist(), ends.tolist())):
        out[end - r - 1:end - 1] = padded[b, :r].to(out)
    return out


def sparse_rows(micro_batch, n_rows: int) -> Optional[SparseProxy]:
    """The rollout's sparse proxy of a micro-batch in packed rows (None without one)."""
    if _proxy.SPARSE_KEYS[0] not in micro_batch.keys():
        return None
    td = micro_batch.select(_proxy.ROLLOUT_LOGQ, *_proxy.SPARSE_KEYS)
    td = td.to_padded_tensor() if any(td[k].is_nested for k in td.keys()) else td
    # rows that predict no response token get the first recorded row: a valid proxy, never read
    parts = [td[k] for k in (*_proxy.SPARSE_KEYS, _proxy.ROLLOUT_LOGQ)]
    rows = [response_rows(micro_batch, t, n_rows, t[0, 0]) for t in parts]
    return SparseProxy(rows[0], rows[1].float(), rows[2].float(), rows[3].float())


def packed(t: Tensor, micro_batch) -> Tensor:
    """(bsz, max_len, *) padded model rows -> (total_nnz, *) in sequence order."""
    lengths = micro_batch["input_ids"].offsets().diff().tolist()
    return torch.cat([t[b, :n] for b, n in enumerate(lengths)])


class LpRegFSDPEngineWithLMHead(FSDPEngineWithLMHead):
    """verl's FSDP LM engine; with loss_mode=lpreg its outputs and loss are lpreg's."""

    _lpreg_selections = None

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
            return super().forward_backward_batch(data, functools.partial(lpreg_ppo_loss, config=config),
                                                  forward_only)
        finally:
            self._lpreg_selections = None

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
        reason = scaled_logits(getattr(inner, "config", None))
        if reason:
            raise NotImplementedError(f"use_fused_kernels=True with loss_mode=lpreg computes logits = h @ W.T + b; "
                                      f"{reason}: set actor_rollout_ref.model.use_fused_kernels=False")
        backbone, head = lm_parts(inner)
        opts = self._lpreg_opts(config, record)
        rmpad = tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True)

        def forward(input_ids=None, attention_mask=None, position_ids=None, temperature=1.0, shift_labels=None,
                    return_dict=True, use_cache=False, **extra):
            if any(v is not None for v in extra.values()):
                raise NotImplementedError(f"use_fused_kernels with loss_mode=lpreg takes text inputs only, got "
                                          f"{sorted(k for k, v in extra.items() if v is not None)}")
            hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False).last_hidden_state
            if rmpad:
                hidden, labels = hidden[0], shift_labels[0]
            else:  # padded rows -> packed rows; labels: each sequence's next tokens (verl's roll)
                hidden = packed(hidden, micro_batch.to(hidden.device))
                labels = torch.roll(micro_batch["input_ids"].values().to(hidden.device), shifts=-1, dims=0)
            weight, bias = gathered_param(head.weight), gathered_param(getattr(head, "bias", None))
            # a dict: FSDP2 finds the output tensors (a pytree) and unshards the root again before
            # their backward, which re-reads the LM head
            return {"lpreg": self._lpreg_rows(hidden, weight, bias, labels, float(temperature), opts, micro_batch,
                                              record)}

        inner.forward = forward
        try:
            yield
        finally:
            del inner.forward

    def _lpreg_opts(self, config, record) -> Dict[str, Any]:
        if record is not None:
            return json.loads(record)  # record_spec's keys: mode, threshold, sparse, topk
        o = lpreg_options(config.policy_loss)
        return {"mode": o["lpreg_mode"], "threshold": o["lpreg_threshold"], "sparse": False, "topk": 0}

    def _lpreg_rows(self, hidden, weight, bias, labels, temperature, opts, micro_batch, record):
        """Fused: TokenStats of the rows (training), or the rollout record (old-log-prob pass)."""
        if record is None:
            # a sparse proxy carries its own filter: fused_linear_token_stats then ignores mode / threshold
            return fused_linear_token_stats(hidden.to(weight.dtype), weight, labels, bias=bias,
                                            proxy=sparse_rows(micro_batch, hidden.shape[0]), temperature=temperature,
                                            mode=opts["mode"], threshold=opts["threshold"])
        return _proxy.record_hidden(hidden, weight, bias, labels, chunk_size=None, temperature=temperature,
                                    mode=opts["mode"], threshold=opts["threshold"], sparse=opts["sparse"],
                                    topk=opts["topk"])

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
        out = {k: torch.nested.nested_tensor_from_jagged(v, cu_seqlens) for k, v in zip(names, values)}
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
