"""The update of a step: `mini_batches` optimizer steps, each over its micro-batches (gradient
accumulation), the loss aggregated exactly across micro-batches and ranks (lpreg.trainer.losses)."""

import contextlib
from typing import Dict

from torch import Tensor

from lpreg.trainer.losses import method_loss
from lpreg.trainer.scoring import StepPlan

__all__ = ["update"]


def update(run, plan: StepPlan) -> tuple[dict, list]:
    """One optimizer step per mini-batch; gradient accumulation over its micro-batches. Returns
    (metric sums over the step, gradient norms)."""
    cfg, acc, model = run.cfg, run.acc, run.model
    sums: Dict[str, Tensor] = {}
    grad_norms, j = [], 0
    for mini, denom in zip(plan.micro, plan.denominators):
        for k, mb in enumerate(mini):
            b = plan.batch.slice(mb)
            with contextlib.nullcontext() if k == len(mini) - 1 else acc.no_sync(model):
                logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
                loss, mb_sums = method_loss(
                    cfg.loss, logits[:, :-1], b.labels, plan.tok_adv[mb], plan.old_logp[j], b.loss_mask, cfg,
                    selected=plan.choices[j], proxy=plan.proxies[j], denominator=max(denom, 1.0))
                # this micro-batch's share of the mini-batch loss (all ranks' denominator); DDP
                # averages gradients over ranks, so times world
                acc.backward(loss * acc.num_processes)
            # logged pg_loss: the mean over mini-batches of the loss each optimizer step took
            mb_sums["actor/pg_loss"] = mb_sums["actor/pg_loss"] * (plan.n_tokens / len(plan.micro))
            for key, v in mb_sums.items():
                sums[key] = sums.get(key, 0.0) + v.detach().float().cpu()
            j += 1
        grad_norms.append(float(acc.clip_grad_norm_(model.parameters(), cfg.grad_clip)))
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    return sums, grad_norms
