"""The policy: a tiny Llama-style model or a local Hugging Face checkpoint, prompts, SFT.

- `build_tiny_model`: a randomly initialised Llama-style causal LM sized for CPU runs,
  tied embeddings (0.87M parameters at the default 128 x 4 layers; the SFT command's
  measured default is 64 x 2, 0.1M).
- `load_policy`: `None` gives the tiny model and the character tokenizer; a path loads a
  local checkpoint (no download is ever attempted: `local_files_only=True`) with the output
  transform its config records (lpreg.trainer.output_transform).
- `format_prompt`: the tokenizer's chat template when it has one, else the plain template
  "Q: {question}\nA: ", after which the model writes the bare answer ("19") and eos. The
  reward reads that bare number through its last-number fallback (see reward.py).
- `generate_completions`: batched HF generation with explicit sampling settings, shared
  by `warm_start` and `lpreg.trainer.evaluate`.
- `warm_start`: supervised fine-tuning on `prompt + answer + eos` (loss on the answer and
  eos tokens only). The cpu-tiny preset uses it to bring the random tiny model to partial
  competence before RL; measured figures are in its docstring.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import random
import time
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lpreg.trainer.output_transform import restore_output_transform
from lpreg.trainer.problem import PLAIN_TEMPLATE, Problem
from lpreg.trainer.reward import extract_answer
from lpreg.trainer.tokenizer import build_char_tokenizer

# Defaults of `python -m lpreg.trainer.sft` (full task, operands 0..99), chosen by
# measurement (figures in `warm_start`'s docstring): under 2 CPU-minutes on one thread
# for partial competence, ~30-40% greedy and ~20-25% sampled accuracy on held-out problems.
TINY_MODEL_DEFAULTS = {"hidden_size": 64, "num_layers": 2, "num_heads": 4}
WARM_START_DEFAULTS = {"steps": 1800, "lr": 3e-3, "batch_size": 64}


def _attn_implementation(device: str | torch.device, dtype: torch.dtype) -> str:
    # flash-attn kernels exist only for CUDA and half precision; everything else uses SDPA.
    on_cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if on_cuda and has_flash and dtype in (torch.float16, torch.bfloat16):
        return "flash_attention_2"
    return "sdpa"


def build_tiny_model(
    tokenizer: PreTrainedTokenizerBase,
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> PreTrainedModel:
    """A randomly initialised Llama-style causal LM over `tokenizer`'s vocabulary.

    Llama rather than Qwen2 on purpose: transformers 5 maps a "qwen2" checkpoint to its
    Qwen2 (byte-level BPE) tokenizer class whatever tokenizer_config.json says, which
    would silently replace the character tokenizer's pipeline on reload; "llama"
    checkpoints keep the saved tokenizer.json as is.

    Special-token ids come from the tokenizer; input and output embeddings are tied.
    Initialisation is deterministic in `seed` and leaves the global RNG state untouched.
    """
    if hidden_size % num_heads != 0:
        raise ValueError(
            f"hidden_size must be divisible by num_heads, got hidden_size={hidden_size}, "
            f"num_heads={num_heads}"
        )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=3 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max(512, tokenizer.model_max_length if tokenizer.model_max_length < 1e6 else 512),
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = _attn_implementation(device, dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model.to(device=device, dtype=dtype)


def load_policy(
    model_path: str | None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return `(model, tokenizer)`: the tiny model for `None`, else a local HF checkpoint.

    The tokenizer pads on the left (generation) and gets pad = eos when it has no pad token. The
    output transform the checkpoint's config records is reinstalled (a checkpoint is the policy).
    Raises ValueError when `model_path` is missing or not a Hugging Face model directory, or names an
    unknown output transform.
    """
    if model_path is None:
        tokenizer = build_char_tokenizer()
        return build_tiny_model(tokenizer, dtype=dtype, device=device), tokenizer
    if not os.path.isdir(model_path) or not os.path.isfile(os.path.join(model_path, "config.json")):
        raise ValueError(
            f"model path does not exist / is not a Hugging Face model directory "
            f"(no config.json): {model_path!r}"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            model_path,
            local_files_only=True,
            dtype=dtype,
            attn_implementation=_attn_implementation(device, dtype),
        )
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(
            f"model path does not exist / is not a Hugging Face model directory: "
            f"{model_path!r} ({type(err).__name__}: {err})"
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    restore_output_transform(model, source=f"model {model_path!r}")
    return model.to(device), tokenizer


def format_prompt(tokenizer: PreTrainedTokenizerBase, question: str) -> str:
    """The prompt text for `question`: chat template if the tokenizer has one, else plain."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
    return PLAIN_TEMPLATE.format(question=question)


def prompt_adds_special_tokens(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether prompts are encoded with the tokenizer's special tokens (its BOS).

    A chat template already writes BOS into the text, so adding it again would double it;
    a plain-template prompt for a base model needs the tokenizer to add BOS. (The
    character tokenizer adds nothing either way.)"""
    return not getattr(tokenizer, "chat_template", None)


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends a completion: the tokenizer's eos first, then the model's own eos
    list (instruct models often stop on a turn-end token that is not the tokenizer's eos).

    Raises ValueError when neither declares one: a completion could never end."""
    ids: list[int] = []
    for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        for i in source if isinstance(source, (list, tuple)) else [source]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise ValueError("the tokenizer and model declare no eos_token_id; a completion could never end")
    return ids


@contextlib.contextmanager
def fresh_generation_config(model: PreTrainedModel) -> Iterator[None]:
    """Swap the model's own `generation_config` for an empty one during a `generate` call.

    transformers 5 fills every field left None in the GenerationConfig passed to `generate`
    from `model.generation_config` (then from library defaults, which include top_k = 50), so a
    checkpoint's temperature, top-k/p, min-p or repetition penalty would leak in. Restored after."""
    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


@torch.no_grad()
def generate_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    num_samples: int = 1,
    greedy: bool = True,
    temperature: float = 1.0,
    max_new_tokens: int = 8,
    batch_size: int = 64,
    seed: int = 0,
) -> list[list[str]]:
    """Generate `num_samples` completions per prompt; returns one list of strings per prompt.

    Sampling is plain softmax(z / temperature): top_p=1.0, top_k=0, no penalties. Nothing
    from the checkpoint's own generation_config (its temperature, top-k, top-p, min-p,
    repetition penalty, min length) can leak in (`fresh_generation_config`). Generation stops
    at every eos id of tokenizer and model. Special tokens are removed from the text.
    Greedy generates once per prompt and repeats it `num_samples` times.
    """
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    eos = eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    neutral = dict(
        num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0,
        max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad,
        bos_token_id=tokenizer.bos_token_id, use_cache=True,
    )
    if greedy:
        gen = GenerationConfig(do_sample=False, **neutral)
    else:
        gen = GenerationConfig(
            do_sample=True, temperature=float(temperature), top_p=1.0, top_k=0, min_p=None,
            typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, **neutral,
        )
    # Greedy samples are identical, so generate once and repeat.
    per_call = 1 if greedy else num_samples
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    out: list[list[str]] = []
    try:
        # fork_rng: the caller's RNG streams (training, rollouts) are left as they were.
        cuda_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda_ids), fresh_generation_config(model):
            torch.manual_seed(seed)
            step = max(1, batch_size // per_call)
            for start in range(0, len(prompts), step):
                chunk = prompts[start : start + step]
                enc = tokenizer(chunk, return_tensors="pt", padding=True,
                                add_special_tokens=prompt_adds_special_tokens(tokenizer))
                enc = {k: v.to(device) for k, v in enc.items()}
                gen.num_return_sequences = per_call
                seqs = model.generate(**enc, generation_config=gen)
                texts = tokenizer.batch_decode(
                    seqs[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
                )
                for i in range(len(chunk)):
                    group = texts[i * per_call : (i + 1) * per_call]
                    out.append(group * num_samples if greedy else group)
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return out


# a change of a warm-start target's token ids, drawn from the warm start's own RNG (`warm_start`'s augment)
Augment = Callable[[list[int], random.Random], list[int]]


def _sft_batch(tokenizer, problems: list[Problem], device, augment: Augment | None = None,
               rng: random.Random | None = None) -> tuple[torch.Tensor, ...]:
    # Right-padded prompt + answer + eos; labels are -100 except on answer and eos tokens,
    # so the model is taught to answer, not to predict the question. `augment`: a change of the
    # answer's token ids (input and label alike), drawn from `rng`.
    rows, labels = [], []
    for p in problems:
        prompt = tokenizer.encode(format_prompt(tokenizer, p.question),
                                  add_special_tokens=prompt_adds_special_tokens(tokenizer))
        text = p.target if p.target is not None else p.answer  # a task's worked form, else the answer
        answer = tokenizer.encode(text, add_special_tokens=False)
        if augment is not None:
            if rng is None:
                raise ValueError("_sft_batch: augment needs rng")
            answer = augment(answer, rng)
        target = answer + [tokenizer.eos_token_id]
        rows.append(prompt + target)
        labels.append([-100] * len(prompt) + target)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    lab = torch.tensor([r + [-100] * (width - len(r)) for r in labels], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    return ids, mask, lab


def _target_logits(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor,
                   lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (n, V) fp32, targets (n,)) at the n positions that predict a labelled token.

    The tiny Llama applies its LM head to those positions only: the cross-entropy over the others is
    masked out anyway, and the head over a 3,000-token vocabulary at every prompt position was
    most of a warm-start step (measured on a 3,000-token vocabulary's warm start: 72 against 122
    CPU-ms per step). Other architectures may scale or soft-cap their logits inside `forward`, so they take
    the full forward."""
    target = lab[:, 1:]
    keep = target != -100
    if isinstance(model, LlamaForCausalLM):
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
        return model.lm_head(hidden[keep]).float(), target[keep]
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    return logits[keep].float(), target[keep]


def answer_accuracy(completions: list[str], problems: list[Problem]) -> float:
    """Exact-match accuracy of the answer each completion gives (`reward.extract_answer`: a
    bare number, or a worked form's "Answer: X") against the gold answers.

    Cheap and exact for the built-in integer tasks; RL and evaluation use the math-verify
    reward instead."""
    if not problems:
        return 0.0
    hits = sum(extract_answer(c.strip().split("\n")[0]) == p.answer.strip() for c, p in zip(completions, problems))
    return hits / len(problems)


def warm_start(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: list[Problem],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    log: Callable[[str], None] = print,
    eval_problems: list[Problem] | None = None,
    log_every: int = 100,
    augment: Augment | None = None,
) -> dict:
    """Supervised fine-tuning on `prompt + answer + eos`; returns the final metrics.

    AdamW with linear warm-up (5% of steps) and cosine decay to 10% of `lr`, grad-norm
    clip 1.0. Evaluation uses `eval_problems`, or else holds out the last
    min(64, len//10) of `problems` (never trained on). Returns
    {"loss", "token_accuracy", "greedy_accuracy", "sampled_accuracy", "steps", "seconds",
    "cpu_seconds"} (the two times cover the training steps only; cpu_seconds is this
    process's CPU time, a figure that other load on the machine does not inflate).
    Sampled accuracy is one sample per problem at temperature 1.0. `augment(answer_ids, rng)`: a
    change of each target's token ids (a task's, `lpreg.trainer.tasks.register_warm_start_augment`),
    drawn from an RNG of its own seeded by `seed`, so that without it the batches are unchanged.

    Measured (one torch thread, this repo's 2-core CPU box, under other load; held-out
    test problems; CPU-seconds of training):
      - 64 wide x 2 layers, full task, bs 64, lr 3e-3 (the sft.py default): 1800 steps,
        110 CPU-s: greedy 32%, sampled 21% (256 problems; lpreg-eval on 200: greedy 39%,
        avg@8 26%, pass@8 84% at T=1). 2000 steps, 124-127 CPU-s: greedy 38-39%,
        sampled 25-28%; halfway through a run (1000 of 2000 steps): 14% / 12%.
      - 128 x 2, operands <= 19 (706 train problems), bs 32, lr 3e-3: 400 steps, 30 CPU-s:
        greedy 16%, sampled 18%; 800 steps, 57 CPU-s: 14% / 16% (it memorises the
        small train set rather than generalising).
      - 128 x 4, full task, bs 64: lr 3e-3, 400 steps, 78 CPU-s: 7% / 5%; lr 1e-2
        stalls at loss 1.5 (1% / 1%).
    """
    if steps < 0 or batch_size < 1 or not lr > 0:
        raise ValueError(f"need steps >= 0, batch_size >= 1, lr > 0; got {steps}, {batch_size}, {lr}")
    augment_rng = random.Random(f"noise:{seed}")  # the seed string of the first augment: its batches unchanged
    if eval_problems is None:
        held = min(64, len(problems) // 10)
        problems, eval_problems = problems[: len(problems) - held], problems[len(problems) - held :]
    if not problems:
        raise ValueError("warm_start needs at least one training problem, got none")
    device = next(model.parameters()).device
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    start, cpu_start = time.perf_counter(), time.process_time()
    loss_value, tok_acc = float("nan"), float("nan")
    for step in range(steps):
        ids, mask, lab = _sft_batch(tokenizer, rng.choices(problems, k=batch_size), device, augment, augment_rng)
        logits, target = _target_logits(model, ids, mask, lab)
        loss = F.cross_entropy(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_value = loss.item()
        tok_acc = (logits.argmax(-1) == target).sum().item() / max(1, target.numel())
        if log_every and (step + 1) % log_every == 0:
            log(f"warm_start step {step + 1}/{steps} loss {loss_value:.4f} token_acc {tok_acc:.3f}")
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    metrics = {"loss": loss_value, "token_accuracy": tok_acc,
               **_held_out_accuracy(model, tokenizer, eval_problems, seed),
               "steps": steps, "seconds": seconds, "cpu_seconds": cpu_seconds}
    log("warm_start done: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return metrics


def _held_out_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, problems: list[Problem],
                       seed: int) -> dict:
    """Greedy and T = 1 sampled exact-match accuracy (one sample per problem)."""
    prompts = [format_prompt(tokenizer, p.question) for p in problems]
    max_new = max((len(tokenizer.encode(p.target or p.answer, add_special_tokens=False)) for p in problems),
                  default=1) + 2
    greedy = generate_completions(model, tokenizer, prompts, greedy=True, max_new_tokens=max_new, seed=seed)
    sampled = generate_completions(
        model, tokenizer, prompts, greedy=False, temperature=1.0, max_new_tokens=max_new, seed=seed
    )
    return {"greedy_accuracy": answer_accuracy([g[0] for g in greedy], problems),
            "sampled_accuracy": answer_accuracy([s[0] for s in sampled], problems)}
