"""Rollout: sample n completions per prompt with HF `generate`, then pack them for the update.

Determinism. Every prompt's group is generated in its own `generate` call under a torch RNG
seeded from (seed, step, global prompt index), inside `torch.random.fork_rng` so the trainer's
own RNG stream is untouched. The samples therefore do not depend on how the step's prompts are
sharded across ranks, nor on what ran before: a 2-rank run and a 1-rank run at the same global
batch see the same completions, and a resumed run sees the same ones as an uninterrupted run.
(The price: one `generate` call per prompt instead of one per batch.)

Sampling is explicit: temperature, top_p = 1, top_k = 0, nothing else. In transformers 5 any
field left None in the GenerationConfig passed to `generate` is filled from the model's own
`generation_config` (and then from library defaults, which include top_k = 50), so the model's
config is swapped for a fresh one during the call (`model.fresh_generation_config`, shared with
evaluation) and every sampling field is set here. EOS ids: `model.eos_token_ids`.

Masks. A completion ends at its first EOS token (any of the tokenizer's / model's EOS ids),
which belongs to the response (the policy chose to stop); everything after it is padding. Pad
may equal EOS, so the mask comes from the first EOS position, never from `!= pad`.

The step's rollout stage (`rollout`): this rank's prompts (`problem_at`: a fresh permutation of the
problems per epoch), n samples each, their rewards, and group advantages on the global batch.
"""

import random
import time
from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
from torch import Tensor
from transformers import GenerationConfig

from lpreg.trainer.advantage import group_advantages
from lpreg.trainer.model import eos_token_ids, format_prompt, fresh_generation_config
from lpreg.trainer.problem import Problem
from lpreg.trainer.ranks import full_params_for_generation, gather_floats

__all__ = ["RolloutBatch", "rollout_seed", "eos_token_ids", "response_lengths", "generate_group", "pack",
           "problem_at", "Rollout", "rollout"]


def rollout_seed(seed: int, step: int, prompt_index: int) -> int:
    """A 63-bit seed from (run seed, step, global prompt index); distinct for distinct triples."""
    x = (int(seed) * 1_000_003 + int(step)) * 1_000_033 + int(prompt_index)
    # splitmix64 finaliser: nearby triples give unrelated streams
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF


def response_lengths(responses: torch.Tensor, eos_ids: Sequence[int]) -> torch.Tensor:
    """responses: (B, R) generated ids (after the prompt). Returns (B,) long: tokens up to and
    including the first EOS, or R when a row never emitted one (truncated)."""
    is_eos = torch.isin(responses, torch.as_tensor(eos_ids, device=responses.device))
    R = responses.shape[1]
    pos = torch.arange(R, device=responses.device).expand_as(responses)
    first = torch.where(is_eos, pos, torch.full_like(pos, R)).min(dim=1).values
    return torch.where(first < R, first + 1, first)


def _generation_config(cfg, eos_ids: Sequence[int], pad_id: int) -> GenerationConfig:
    return GenerationConfig(
        do_sample=True, temperature=float(cfg.temperature), top_p=float(cfg.top_p), top_k=int(cfg.top_k),
        min_p=None, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0,
        no_repeat_ngram_size=0, num_beams=1, max_new_tokens=int(cfg.max_new_tokens), min_new_tokens=0,
        eos_token_id=list(eos_ids), pad_token_id=int(pad_id), use_cache=True,
        return_dict_in_generate=False, output_scores=False,
    )


@torch.no_grad()
def generate_group(model, prompt_ids: List[int], n: int, cfg, *, eos_ids: Sequence[int], pad_id: int,
                   seed: int) -> List[List[int]]:
    """Sample n completions of one prompt. prompt_ids: list[int]. Returns a list of n lists
    of response ids, each cut after its first EOS."""
    device = next(model.parameters()).device
    inp = torch.tensor([prompt_ids] * n, dtype=torch.long, device=device)
    gen_cfg = _generation_config(cfg, eos_ids, pad_id)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), fresh_generation_config(model):
        torch.manual_seed(seed)
        out = model.generate(input_ids=inp, attention_mask=torch.ones_like(inp), generation_config=gen_cfg)
    responses = out[:, inp.shape[1]:]
    lengths = response_lengths(responses, eos_ids).tolist()
    return [responses[i, : lengths[i]].tolist() for i in range(n)]


@dataclass
class RolloutBatch:
    """Sequences packed for teacher-forced scoring, right-padded (prompts start at position 0).

    input_ids (B, L); attention_mask (B, L); labels (B, L-1) = input_ids[:, 1:] with -100 off
    the response; loss_mask (B, L-1) float, 1 on response tokens (up to and including EOS).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor

    def slice(self, idx: torch.Tensor) -> "RolloutBatch":
        return RolloutBatch(self.input_ids[idx], self.attention_mask[idx], self.labels[idx], self.loss_mask[idx])

    def to(self, device) -> "RolloutBatch":
        return RolloutBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels, self.loss_mask)))


def pack(prompts: Sequence[List[int]], responses: Sequence[List[int]], pad_id: int) -> RolloutBatch:
    """prompts, responses: lists (same length) of id lists. Returns a RolloutBatch."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"prompts and responses must be non-empty lists of equal length, "
                         f"got {len(prompts)} and {len(responses)}")
    total = [len(p) + len(r) for p, r in zip(prompts, responses)]
    L = max(max(total), 2)
    B = len(prompts)
    input_ids = torch.full((B, L), int(pad_id), dtype=torch.long)
    attention = torch.zeros((B, L), dtype=torch.long)
    resp = torch.zeros((B, L), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        seq = list(p) + list(r)
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention[i, : len(seq)] = 1
        resp[i, len(p): len(seq)] = True
    # position t of the logits predicts token t + 1
    target_is_resp = resp[:, 1:]
    labels = torch.where(target_is_resp, input_ids[:, 1:], torch.full_like(input_ids[:, 1:], -100))
    return RolloutBatch(input_ids, attention, labels, target_is_resp.float())


# ------------------------------------------------------------------- the step's rollout stage


def problem_at(problems: list, position: int, seed: int) -> Problem:
    """The problem at a global data position: a fresh permutation of the problems per epoch."""
    epoch, i = divmod(position, len(problems))
    order = list(range(len(problems)))
    random.Random(seed * 7919 + epoch).shuffle(order)
    return problems[order[i]]


@dataclass
class Rollout:
    """This rank's share of a step's samples, with rewards and advantages."""

    questions: List[str]  # one per sample
    answers: List[str]
    prompt_ids: List[List[int]]
    responses: List[List[int]]
    texts: List[str]
    scores: List[float]  # this rank's rewards
    all_scores: List[float]  # every rank's, in rank order
    seq_adv: Tensor  # (this rank's samples,) advantages
    adv_metrics: Dict[str, float]
    reward_info: Dict[str, int]
    seconds_generate: float
    seconds_reward: float


def rollout(run, step: int) -> Rollout:
    """Generate n samples for each of this rank's prompts, score them, and compute advantages on
    the global batch (so batch-std scaling sees every rank)."""
    cfg, acc = run.cfg, run.acc
    P, n, world = cfg.prompts_per_step, cfg.samples_per_prompt, acc.num_processes
    per_rank = P // world
    first = step * P + acc.process_index * per_rank  # global data position of this rank's first prompt
    mine = [problem_at(run.problems, first + i, cfg.seed) for i in range(per_rank)]
    t0 = time.perf_counter()
    prompt_ids, responses = [], []
    run.policy.eval()
    with full_params_for_generation(acc, run.model):
        for i, prob in enumerate(mine):
            ids = run.tok.encode(format_prompt(run.tok, prob.question), add_special_tokens=False)
            responses += generate_group(run.policy, ids, n, cfg, eos_ids=run.eos_ids, pad_id=run.pad_id,
                                        seed=rollout_seed(cfg.seed, step, first + i))
            prompt_ids += [ids] * n
    run.policy.train()
    t1 = time.perf_counter()
    texts = run.tok.batch_decode(responses, skip_special_tokens=True)
    answers = [p.answer for p in mine for _ in range(n)]
    scores, info = run.reward_worker.score(texts, answers)
    all_scores = gather_floats(acc, scores)
    all_adv, adv_metrics = group_advantages(all_scores, n, std_scaling=cfg.std_scaling, eps=cfg.adv_eps)
    rank = acc.process_index
    return Rollout(
        questions=[p.question for p in mine for _ in range(n)], answers=answers, prompt_ids=prompt_ids,
        responses=responses, texts=texts, scores=scores, all_scores=all_scores,
        seq_adv=all_adv[rank * per_rank * n:(rank + 1) * per_rank * n], adv_metrics=adv_metrics,
        reward_info=info, seconds_generate=t1 - t0, seconds_reward=time.perf_counter() - t1,
    )
