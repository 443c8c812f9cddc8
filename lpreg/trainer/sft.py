"""Supervised warm start of the tiny policy, saved as a checkpoint usable as `--model DIR`.

    python -m lpreg.trainer.sft --output-dir runs/sft            # cpu-tiny defaults
    python -m lpreg.trainer.sft --output-dir runs/sft19 --max-operand 19 --steps 400
    lpreg-eval --model runs/sft --data builtin --k 8

Builds the character tokenizer and the tiny Llama-style model, fine-tunes it on the
built-in arithmetic task's train split (`model.warm_start`: loss on answer + eos only),
reports greedy and T=1 sampled accuracy on held-out test problems, and writes
`save_pretrained` model and tokenizer files plus `warm_start_metrics.json` to the output
directory. The defaults (`model.WARM_START_DEFAULTS`) aim at partial competence, so that
RL has non-zero reward and room to improve; raise --steps for a stronger model.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from lpreg.trainer.model import TINY_MODEL_DEFAULTS, WARM_START_DEFAULTS, build_tiny_model, warm_start
from lpreg.trainer.tasks import arithmetic_problems, split_size
from lpreg.trainer.tokenizer import build_char_tokenizer


def _parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m lpreg.trainer.sft", description=__doc__.split("\n\n")[0])
    ap.add_argument("--output-dir", required=True, help="where to save the model and tokenizer")
    ap.add_argument("--steps", type=int, default=WARM_START_DEFAULTS["steps"])
    ap.add_argument("--lr", type=float, default=WARM_START_DEFAULTS["lr"])
    ap.add_argument("--batch-size", type=int, default=WARM_START_DEFAULTS["batch_size"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=8000,
                    help="train-split problems to draw (at most the split's size)")
    ap.add_argument("--max-operand", type=int, default=99,
                    help="operands in [0, N]; 19 matches the trainer's cpu-tiny preset")
    ap.add_argument("--n-eval", type=int, default=256, help="test-split problems for the final accuracy")
    ap.add_argument("--hidden-size", type=int, default=TINY_MODEL_DEFAULTS["hidden_size"])
    ap.add_argument("--num-layers", type=int, default=TINY_MODEL_DEFAULTS["num_layers"])
    ap.add_argument("--num-heads", type=int, default=TINY_MODEL_DEFAULTS["num_heads"])
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: a tiny model is all per-op overhead, and a "
                         "second thread made SFT steps 30x slower on a busy 2-core machine)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    for name in ("steps", "batch_size", "n_train", "n_eval"):
        if getattr(args, name) < (0 if name == "steps" else 1):
            ap.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return args


def run(argv=None) -> dict:
    """Parse `argv`, warm-start, save; returns the warm-start metrics."""
    args = _parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(
        tokenizer, hidden_size=args.hidden_size, num_layers=args.num_layers,
        num_heads=args.num_heads, seed=args.seed, device=args.device,
    )
    def draw(n: int, seed: int, split: str):
        n = min(n, split_size(split, args.max_operand))
        return arithmetic_problems(n, seed=seed, split=split, max_operand=args.max_operand)

    metrics = warm_start(
        model, tokenizer, draw(args.n_train, args.seed, "train"),
        steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
        eval_problems=draw(args.n_eval, args.seed + 1, "test"),
    )
    os.makedirs(args.output_dir, exist_ok=True)
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    with open(os.path.join(args.output_dir, "warm_start_metrics.json"), "w") as f:
        json.dump({"args": vars(args), "metrics": metrics}, f, indent=2)
    return {**metrics, "output_dir": args.output_dir}


def main(argv=None) -> int:
    """`python -m lpreg.trainer.sft`: warm-start, save, say where (returns the exit status, 0)."""
    out = run(argv)
    print(f"saved model and tokenizer to {out['output_dir']} (held-out greedy accuracy "
          f"{out['greedy_accuracy']:.3f}, sampled {out['sampled_accuracy']:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
