"""Is the spark rare and valuable for the warm-started policy? The cpu-sparks design check.

    python -m lpreg.experiments.spark_value                      # the cpu-sparks preset's warm start
    python -m lpreg.experiments.spark_value --warmup-steps 600   # any TrainConfig field as a flag

Warm-starts the preset's policy exactly as `lpreg-train` does (same task, tokenizer, model, seed
and SFT), then, on held-out hard items (`sparks.is_hard`), `--k` samples each at T = 1:

    p_spark        mean p(check | prompt) at the first answer position
    direct         accuracy when the policy picks its first token itself (and how often it picks check)
    forced_spark   accuracy when the first token is forced to be check

The spark is rare when p_spark is small, and valuable when forced_spark > direct. Prints one
JSON object; also reports the warm start's own metrics and its CPU time.
"""

import json
import sys
import time
from typing import Dict, List

import torch

from lpreg.experiments import sparks
from lpreg.experiments.diversity import spark_probability
from lpreg.trainer.config import load_config
from lpreg.trainer.model import answer_accuracy, format_prompt, generate_completions
from lpreg.trainer.setup import build_policy, load_task, run_warm_start


def _accuracy(model, tok, problems, k: int, max_new_tokens: int, prefix: str = "") -> Dict[str, float]:
    prompts = [format_prompt(tok, p.question) + prefix for p in problems]
    groups = generate_completions(model, tok, prompts, num_samples=k, greedy=False, max_new_tokens=max_new_tokens,
                                  seed=1)
    texts = [prefix + t for g in groups for t in g]
    gold = [p for p in problems for _ in range(k)]
    return {"accuracy": answer_accuracy(texts, gold),
            "spark_usage": sum(t.startswith(sparks.SPARK) for t in texts) / max(1, len(texts))}


def measure(argv: List[str], n_items: int = 64, k: int = 8) -> Dict:
    """Warm-start the config `argv` describes (default preset cpu-sparks) and measure the spark."""
    cfg = load_config(["--preset", "cpu-sparks", *argv])
    if cfg.task != "sparks":
        raise ValueError(f"--task must be 'sparks' (the task with a spark token), got {cfg.task!r}")
    torch.set_num_threads(max(1, cfg.torch_threads))
    torch.manual_seed(cfg.seed)
    model, tok = build_policy(cfg, "cpu")
    start = time.process_time()
    ws = run_warm_start(cfg, model, tok, load_task(cfg)[1], log=lambda _: None)
    hard = [p for p in sparks.sparks_split("test", 0) if sparks.is_hard(p)][:n_items]
    ids = [tok.encode(format_prompt(tok, p.question), add_special_tokens=False) for p in hard]
    p_spark = spark_probability(model, ids, [tok.get_vocab()[sparks.SPARK]], cfg.temperature)
    return {
        "warmup_steps": cfg.warmup_steps,
        "warm_start": {key: ws[key] for key in ("greedy_accuracy", "sampled_accuracy")},
        "held_out_hard_items": len(hard), "k": k, "p_spark": sum(p_spark) / len(p_spark),
        "direct": _accuracy(model, tok, hard, k, cfg.max_new_tokens),
        "forced_spark": _accuracy(model, tok, hard, k, cfg.max_new_tokens, prefix=sparks.SPARK),
        "cpu_seconds": time.process_time() - start,
    }


def main(argv=None) -> int:
    print(json.dumps(measure(list(sys.argv[1:] if argv is None else argv)), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
