"""The diagnosis' inputs: the policy (a Hugging Face directory or an `lpreg-train` checkpoint) and the
prompts with their answers (the trainer's data formats), each refused with a message naming the field.

A checkpoint is loaded the trainer's way (`lpreg.trainer.model.load_policy`), so whatever the trainer
restores with it (an output transform recorded in its config.json) is what is measured: a diagnosis of a
policy without its output floor would measure another model.
"""

import os
from typing import List, Optional, Sequence, Tuple, Union

import torch

from lpreg.trainer import checkpoint as ckpt
from lpreg.trainer.data import load_problems
from lpreg.trainer.model import load_policy
from lpreg.trainer.problem import Problem

# the files from which transformers' AutoTokenizer can build a tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when there is one, else cpu; anything else must be a device torch can use here."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device must be 'auto' or a torch device ('cpu', 'cuda', 'cuda:1'), got {device!r}") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine (use --device cpu)")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 on a GPU (a model of GPU size), float32 on the CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


def model_directory(model: str) -> str:
    """The Hugging Face directory of `model`: the directory itself, or an `lpreg-train` checkpoint's
    (`<run>/checkpoints/step_N`, or a run directory, whose newest complete checkpoint is taken)."""
    if not isinstance(model, str) or not model:
        raise ValueError(f"model must be a local directory (a Hugging Face model or an lpreg-train checkpoint), "
                         f"got {model!r}")
    if not os.path.isdir(model):
        raise ValueError(f"model: {model!r} is not a directory (a Hugging Face model or an lpreg-train checkpoint)")
    if os.path.isfile(os.path.join(model, "config.json")):
        return model
    step = model if os.path.isfile(os.path.join(model, ckpt.MARKER)) else ckpt.latest_checkpoint(model)
    if step is not None and os.path.isfile(os.path.join(step, "model", "config.json")):
        return os.path.join(step, "model")
    raise ValueError(f"model: {model!r} holds neither a Hugging Face model (config.json) nor a complete "
                     f"lpreg-train checkpoint (checkpoints/step_N/{ckpt.MARKER})")


def load_model(model: str, *, device: torch.device, dtype: torch.dtype):
    """(model in eval mode, tokenizer) from a directory; ValueError naming `model` otherwise."""
    path = model_directory(model)
    if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise ValueError(f"model: {path!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the "
                         f"model's tokenizer there with tokenizer.save_pretrained({path!r})")
    try:
        policy, tokenizer = load_policy(path, dtype=dtype, device=device)
    except ValueError as err:
        raise ValueError(f"model: {err}") from err
    return policy.eval(), tokenizer


def _skipped_lines(skipped) -> str:
    """The trainer reader's skipped rows (`lpreg.trainer.data.SkippedRow`: "line 2: no answer") as text."""
    return "; ".join(str(row) for row in skipped)


def load_prompts(data: Optional[str], problems: Optional[Sequence[Union[Problem, Tuple[str, str]]]],
                 limit: int) -> List[Problem]:
    """The first `limit` problems of `data` (a .jsonl / .parquet file the trainer reads) or of `problems`
    (Problem objects or (question, answer) pairs). Every row must be usable: a row the trainer would skip
    (no answer, an empty question) is an error naming its line, since a diagnosis that silently drops
    prompts measures something else than the user asked for."""
    if (data is None) == (problems is None):
        raise ValueError("give exactly one of data (a .jsonl or .parquet file) and problems (a list), "
                         f"got data={data!r} and problems={'None' if problems is None else 'a list'}")
    if data is not None:
        try:
            rows, skipped = load_problems(data)
        except ValueError as err:
            raise ValueError(f"data: {err}") from err
        if skipped:
            raise ValueError(f"data {data!r}: {_skipped_lines(skipped)} (each row needs a question and an answer)")
        return list(rows[:limit])
    assert problems is not None
    out = []
    for i, p in enumerate(problems):
        if not isinstance(p, Problem):
            if not (isinstance(p, (tuple, list)) and len(p) == 2):
                raise ValueError(f"problems[{i}] must be a Problem or a (question, answer) pair, got {p!r}")
            p = Problem(question=p[0], answer=p[1])
        if not isinstance(p.question, str) or not p.question.strip():
            raise ValueError(f"problems[{i}]: the question is empty ({p.question!r})")
        if not isinstance(p.answer, str) or not p.answer.strip():
            raise ValueError(f"problems[{i}]: the answer is missing or empty ({p.answer!r})")
        out.append(p)
    if not out:
        raise ValueError("problems is empty: give at least one (question, answer) pair")
    return out[:limit]
