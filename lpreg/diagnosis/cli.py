"""`lpreg-diagnose`: will Lp-Reg act on my model? (docs/diagnose.md)

    lpreg-diagnose MODEL --data prompts.jsonl [--samples 8] [--temperature 1] [--tokens-per-call 4096]
                   [--kappa 0.02] [--rho 0.01] [--compat released] [--mode min_p] [--heatmap grid.png] [--json]

Prints the report (or, with --json, one JSON object on stdout); progress bars go to stderr. A bad input
exits with status 2 and a message naming the field.
"""

import argparse
import json
import sys
from typing import List, Optional

from lpreg.diagnosis.options import BACKENDS, COMPATS, DEFAULT_RHOS, DEFAULT_THRESHOLDS, DTYPES, MODES, REWARDS


def _floats(text: str) -> List[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lpreg-diagnose", description=(
        "Will Lp-Reg act on my model? Samples G completions per prompt, scores them with the trainer's reward, "
        "and reports what Lp-Reg selects and how hard it pushes, at your settings and over a kappa x rho grid."))
    p.add_argument("model", help="a local Hugging Face model directory, or an lpreg-train checkpoint / run directory")
    p.add_argument("--data", required=True, help="a .jsonl or .parquet file of questions with answers")
    p.add_argument("--prompts", type=int, default=32, help="how many prompts to use (default 32)")
    p.add_argument("--samples", "-G", type=int, default=8, help="completions per prompt (default 8)")
    p.add_argument("--temperature", "-T", type=float, default=1.0, help="sampling temperature (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest completion (default 256)")
    p.add_argument("--tokens-per-call", type=int, default=4096,
                   help="response tokens per loss call, your micro-batch (default 4096)")
    p.add_argument("--kappa", "--threshold", dest="threshold", type=float, default=0.02,
                   help="the proxy's filter kappa (default 0.02)")
    p.add_argument("--rho", type=float, default=0.01, help="lowest-probability share (default 0.01)")
    p.add_argument("--compat", choices=COMPATS, default="released", help="the loss form (default released)")
    p.add_argument("--mode", choices=MODES, default="min_p", help="the proxy's filter (default min_p)")
    p.add_argument("--beta", type=float, default=1.0, help="the penalty's weight (default 1)")
    p.add_argument("--reward", choices=REWARDS, default="math-verify", help="the reward (default math-verify)")
    p.add_argument("--kappas", type=_floats, default=list(DEFAULT_THRESHOLDS),
                   help="the grid's kappas, comma-separated")
    p.add_argument("--rhos", type=_floats, default=list(DEFAULT_RHOS), help="the grid's rhos, comma-separated")
    p.add_argument("--examples", type=int, default=20, help="selected tokens shown in context (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="lpreg's token-statistics backend")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--heatmap", metavar="PNG", default=None, help="write the grid's heatmap there")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    from lpreg.diagnosis import diagnose  # imported here: --help needs none of it

    try:
        result = diagnose(
            args.model, data=args.data, prompts=args.prompts, samples=args.samples, temperature=args.temperature,
            max_new_tokens=args.max_new_tokens, tokens_per_call=args.tokens_per_call, threshold=args.threshold,
            rho=args.rho, compat=args.compat, mode=args.mode, beta=args.beta, reward=args.reward,
            thresholds=args.kappas, rhos=args.rhos, examples=args.examples, seed=args.seed, backend=args.backend,
            device=args.device, dtype=args.dtype, progress=not args.no_progress,
        )
    except ValueError as err:
        print(f"lpreg-diagnose: error: {err}", file=sys.stderr)
        return 2
    if args.heatmap:
        result.save_heatmap(args.heatmap)
    if args.json:
        out = result.to_dict()
        if args.heatmap:
            out["heatmap"] = args.heatmap
        print(json.dumps(out, indent=2, allow_nan=False))
    else:
        print(result.to_text())
        if args.heatmap:
            print(f"heatmap: {args.heatmap}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
