"""The scoring pass of a step: pack the rollout, split it into mini- and micro-batches, and, only when
needed, one no-grad forward that fixes what the whole step must know before the first gradient.

When does the scoring pass run? When the step is off-policy (`--mini-batches > 1`: later mini-batches
need the rollout policy's log-probs and, for Lp-Reg, its proxy q, docs/spec.md §1; decided once, in
`StepPlan.off_policy`), or when a step-wide choice (`Loss.selects`: Lp-Reg's paper-form rho-percentile,
80/20, KL-Cov, Clip-Cov) spans several micro-batches or ranks. Otherwise the update is on-policy in one
micro-batch per rank and old_logp = None: the loss uses the update's own log-probs (ratio exactly 1), no
extra forward.
The paper form split over micro-batches keeps the pass: its rho-percentile needs every token's log-prob
before any token's gradient, and recovering them during the update instead would mean re-running the
forward (with grad) of each micro-batch that holds a selected token, which at rho = 1% of tokens spread
over all sequences is nearly all of them.
"""

from dataclasses import dataclass
from typing import List, Optional, cast

import torch
from torch import Tensor

from lpreg import build_proxy, lpreg_token_stats
from lpreg.trainer.losses import LOSSES, StepTokens, loss_denominator
from lpreg.trainer.ranks import gather_floats, gather_varlen, reduce_sum
from lpreg.trainer.rollout import Rollout, RolloutBatch, pack, rollout_seed

__all__ = ["StepPlan", "scoring_pass"]


@dataclass
class StepPlan:
    """What the update needs, per micro-batch j (flattened over mini-batches, in order)."""

    batch: RolloutBatch
    tok_adv: Tensor  # (B, T): A on each response token
    micro: List[List[Tensor]]  # row indices: micro[mini][k]
    old_logp: List[Optional[Tensor]]  # None: on-policy, this pass's own log-probs
    proxies: list  # lpreg.SparseProxy of the rollout policy, or None (on-policy q)
    # the step-wide choice (`Loss.choose`): (B, T) bool token choice, lpreg.SelectionThreshold, or None
    choices: list
    denominators: List[float]  # per mini-batch, all ranks (losses.loss_denominator)
    n_tokens: int  # valid tokens of the step, all ranks
    off_policy: bool  # several updates per rollout: later ones need the rollout policy's log-probs (and q)
    scored: bool  # whether the no-grad scoring pass ran


@torch.no_grad()
def _score(run, batch: RolloutBatch, flat: List[Tensor], off_policy: bool = True):
    """The no-grad pass: per micro-batch old log-probs, entropies and (off-policy Lp-Reg) the
    rollout policy's sparse proxy, built from the same logits (no further forward). off_policy:
    `StepPlan.off_policy` (the default builds everything an off-policy step needs)."""
    cfg = run.cfg
    old_logp, ents, proxies = [], [], []
    for mb in flat:
        b = batch.slice(mb)
        logits = run.model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits[:, :-1]
        st = lpreg_token_stats(logits, b.labels, temperature=cfg.temperature, backend=cfg.token_stats_backend)
        old_logp.append(st.logp)
        ents.append(st.entropy)
        proxies.append(build_proxy(logits, labels=b.labels, temperature=cfg.temperature, mode=cfg.lpreg_mode,
                                   threshold=cfg.lpreg_threshold, k=cfg.lpreg_proxy_k)
                       if off_policy and cfg.loss == "lpreg" else None)
    return old_logp, ents, proxies


def _step_tokens(run, step: int, plan: StepPlan, flat: List[Tensor], ents: List[Tensor]) -> StepTokens:
    """This rank's per-token statistics for a step-wide choice, and how to see every rank's."""
    acc = run.acc
    masks = [plan.batch.loss_mask[mb] for mb in flat]
    counts = gather_floats(acc, [float(sum(int((m > 0).sum()) for m in masks))])
    old_logp = cast(List[Tensor], plan.old_logp)  # called after the scoring pass, which sets every entry
    return StepTokens(old_logp=old_logp, entropy=ents, adv=[plan.tok_adv[mb] for mb in flat], masks=masks,
                      gather=lambda t: gather_varlen(acc, t), offset=int(sum(counts[: acc.process_index])),
                      generator=torch.Generator().manual_seed(rollout_seed(run.cfg.seed, step, -1)))


def scoring_pass(run, ro: Rollout, step: int) -> StepPlan:
    """Pack the step, split it into mini- and micro-batches and, when needed (module docstring),
    run the no-grad scoring pass; then each mini-batch's loss denominator."""
    cfg, acc = run.cfg, run.acc
    batch = pack(ro.prompt_ids, ro.responses, run.pad_id).to(acc.device)
    rows = torch.arange(batch.input_ids.shape[0])
    micro = [[m[j:j + cfg.micro_batch_size] for j in range(0, len(m), cfg.micro_batch_size)]
             for m in rows.chunk(cfg.mini_batches)]
    flat = [mb for mini in micro for mb in mini]
    none = [None] * len(flat)
    spec, off_policy = LOSSES[cfg.loss], cfg.mini_batches > 1
    step_wide = spec.selects(cfg) and (len(flat) > 1 or acc.num_processes > 1)
    plan = StepPlan(batch=batch, tok_adv=ro.seq_adv.to(acc.device)[:, None] * batch.loss_mask, micro=micro,
                    old_logp=list(none), proxies=list(none), choices=list(none), denominators=[],
                    n_tokens=int(reduce_sum(acc, float(batch.loss_mask.sum()))), off_policy=off_policy,
                    scored=off_policy or step_wide)
    if plan.scored:
        plan.old_logp, ents, plan.proxies = _score(run, batch, flat, off_policy)
        if spec.selects(cfg):
            plan.choices = spec.choose(_step_tokens(run, step, plan, flat, ents), cfg)
    j = 0
    for mini in micro:
        part = loss_denominator(cfg, [batch.loss_mask[mb] for mb in mini], plan.choices[j:j + len(mini)],
                                plan.n_tokens)
        plan.denominators.append(reduce_sum(acc, part))
        j += len(mini)
    return plan
