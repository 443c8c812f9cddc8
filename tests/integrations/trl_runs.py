"""TRL training runs for the tests: in-process (one rank), or one rank of `accelerate launch`.

A run is a dict of LpRegGRPOConfig / GRPOConfig settings plus "trainer" ("lpreg" or "trl").
Two choices make runs of different world sizes comparable on the same global batch:
- generation is a deterministic function of (prompt, index in its group, step): each
  completion is sampled from the model's own distribution with its own generator, one row at
  a time (`deterministic_rollout`, TRL's `rollout_func` hook), so it does not depend on which
  rank generates it or on the batch it shares;
- TRL's per-process shuffle of a generation batch (`shuffle_sequence_dict`) is turned off, so
  the micro-batches are the same consecutive slices of the global batch at any world size.
With num_generations = per_device_train_batch_size every group lies on one rank.

As a script (`accelerate launch ... trl_runs.py CASES_JSON OUT`): runs every case listed in the
file CASES_JSON, in order, and writes OUT/rank{r}.json with each case's logs, per-step gradients and
parameters.
"""

import json
import os
import sys
import zlib

import torch

# siblings by their own names: a `tests` package in site-packages would shadow this repository's,
# and the repository root on sys.path would shadow the installed lpreg
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tiny_lm import save_tiny, tiny_model, tiny_tokenizer  # noqa: E402

PROMPTS = ["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op"]


def reward_len_a(completions, **kwargs):
    """Reward: 'a' count plus a character-code hash (so it varies within almost every group)."""
    return [float(c.count("a")) + float(sum(map(ord, c)) % 7) + 0.1 * len(c) for c in completions]


def dataset(n=8):
    from datasets import Dataset

    return Dataset.from_dict({"prompt": PROMPTS[:n]})


@torch.no_grad()
def deterministic_rollout(prompts, trainer):
    """TRL rollout_func: completion j of a prompt at step s is sampled from the current model with a
    generator seeded by (prompt, j, s), token by token, one row per forward (every rank makes the
    same number of forwards, as FSDP2 / ZeRO-3 require)."""
    tok = trainer.processing_class
    model = trainer.accelerator.unwrap_model(trainer.model)
    seen, prompt_ids, completion_ids = {}, [], []
    eos = tok.eos_token_id
    for p in prompts:
        j = seen[p] = seen.get(p, -1) + 1
        g = torch.Generator().manual_seed(zlib.crc32(f"{p}|{j}|{trainer.state.global_step}".encode()))
        ids = tok(p)["input_ids"]
        out = []
        for _ in range(trainer.max_completion_length):  # no early stop: every rank makes the same forwards
            x = torch.tensor([ids + out], device=trainer.accelerator.device)
            logits = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits[0, -1].float()
            out.append(int(torch.multinomial(torch.softmax(logits / trainer.temperature, -1).cpu(), 1, generator=g)))
        end = out.index(eos) + 1 if eos in out else len(out)
        prompt_ids.append(ids)
        completion_ids.append(out[:end])
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}


def no_shuffle():
    """Turn off TRL's per-process shuffle of generation batches (see the module docstring)."""
    import trl.trainer.grpo_trainer as g

    g.shuffle_sequence_dict = lambda d: d


def base_args(out_dir, world: int, **kw):
    """The same global batch at world size 1 or 2: 16 completions (4 prompts x 4) per optimiser
    step, in micro-batches of 4 (accumulation 4 on one rank, 2 on each of two)."""
    args = dict(output_dir=str(out_dir), per_device_train_batch_size=4, gradient_accumulation_steps=4 // world,
                num_generations=4, max_completion_length=6, max_steps=2, learning_rate=0.1, optim="sgd",
                lr_scheduler_type="constant", logging_steps=1, report_to="none", save_strategy="no",
                seed=7, temperature=1.0, bf16=False, disable_dropout=True, dataloader_num_workers=0)
    args["use_cpu"] = True  # accelerate's gloo process group (tests/integrations/accelerate_cpu.py)
    args.update(kw)
    return args


class GradRecorder:
    """A TrainerCallback keeping the (clipped) gradient of every parameter just before each optimiser step."""

    def __init__(self):
        from transformers import TrainerCallback

        rec = self

        class _CB(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
                rec.steps.append(full_grads(model))

        self.steps, self.callback = [], _CB()


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_grads(model):
    """{name: fp32 gradient} gathered to full shape (FSDP2: DTensor; ZeRO-3: DeepSpeed's partitions)."""
    out = {}
    for name, p in model.named_parameters():
        if hasattr(p, "ds_id"):
            from deepspeed.utils import safe_get_full_grad

            g = safe_get_full_grad(p)
        else:
            g = p.grad
        out[name] = None if g is None else _full(g).detach().float().clone()
    return out


def full_params(model):
    out = {}
    for name, p in model.named_parameters():
        if hasattr(p, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                out[name] = p.detach().float().clone()
        else:
            out[name] = _full(p).detach().float().clone()
    return out


class Spies:
    """Counts of the ZeRO-3 head gathers, and per micro-batch the paper selection's
    (k, tokens of this micro-batch in the step-wide set, valid tokens here, n of the step)."""

    def __init__(self, record_selection: bool):
        import lpreg.integrations._trl_forward as fwd
        import lpreg.integrations.trl as lt

        self.gathers, self.selection, self._undo = 0, [], []
        real_gather, real_loss = fwd.maybe_gather_lm_head_ctx, lt.lpreg_regularize

        def gather(*params):
            self.gathers += 1
            return real_gather(*params)

        def loss(base, stats, adv, old, mask, **kw):
            sel = kw.get("selection_threshold")
            if sel is not None:
                ref = stats.logp.detach() if old is None else old
                self.selection.append([sel.k, int(sel.mask(ref, mask > 0).sum()), int((mask > 0).sum()), sel.n_valid])
            return real_loss(base, stats, adv, old, mask, **kw)

        fwd.maybe_gather_lm_head_ctx = gather
        self._undo.append(lambda: setattr(fwd, "maybe_gather_lm_head_ctx", real_gather))
        if record_selection:
            lt.lpreg_regularize = loss
            self._undo.append(lambda: setattr(lt, "lpreg_regularize", real_loss))

    def close(self):
        for undo in self._undo:
            undo()


def train(case, out_dir, world: int = 1, model=None, callbacks=(), trainer_cls=None):
    """Run one case; returns {"logs", "grads" (per step), "params", "gathers", "selection", "trainer"}."""
    from trl import GRPOConfig, GRPOTrainer

    from lpreg.integrations.trl import LpRegGRPOConfig, LpRegGRPOTrainer

    case = dict(case)
    kind = case.pop("trainer", "lpreg")
    deterministic = case.pop("deterministic", True)
    spies = Spies(case.pop("record_selection", False))
    cfg_cls, default_cls = (LpRegGRPOConfig, LpRegGRPOTrainer) if kind == "lpreg" else (GRPOConfig, GRPOTrainer)
    trainer_cls = trainer_cls or default_cls
    args = cfg_cls(**base_args(out_dir, world, **case))
    rec = GradRecorder()
    torch.manual_seed(0)
    kwargs = {"rollout_func": deterministic_rollout} if deterministic else {}
    if model is None and case.get("beta"):  # TRL builds the reference model from the policy's path: save it
        model = os.path.join(str(out_dir), "model")
        if int(os.environ.get("RANK", "0")) == 0:  # transformers writes on the main process only
            save_tiny(model)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
    trainer = trainer_cls(model=model if model is not None else tiny_model(), reward_funcs=reward_len_a, args=args,
                          train_dataset=dataset(), processing_class=tiny_tokenizer(),
                          callbacks=[rec.callback, *callbacks], **kwargs)
    try:
        trainer.train()
    finally:
        spies.close()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"logs": logs, "grads": rec.steps, "params": full_params(trainer.model), "gathers": spies.gathers,
            "selection": spies.selection, "trainer": trainer}


def to_json(run):
    flat = lambda d: {k: (None if v is None else v.reshape(-1).tolist()) for k, v in d.items()}  # noqa: E731
    return {"logs": run["logs"], "grads": [flat(g) for g in run["grads"]], "params": flat(run["params"]),
            "gathers": run["gathers"], "selection": run["selection"]}


def from_json(d):
    t = lambda d: {k: (None if v is None else torch.tensor(v)) for k, v in d.items()}  # noqa: E731
    return {**d, "grads": [t(g) for g in d["grads"]], "params": t(d["params"])}


def main(cases_json, out_dir):
    from accelerate_cpu import enable_sharding_on_cpu

    enable_sharding_on_cpu()
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    no_shuffle()
    cases = json.load(open(cases_json))
    results = []
    for i, case in enumerate(cases):
        run = train(case, os.path.join(out_dir, f"case{i}"), world=int(os.environ.get("WORLD_SIZE", "1")))
        results.append(to_json(run))
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
