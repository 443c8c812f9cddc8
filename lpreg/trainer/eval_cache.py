"""The hashed cache of the step-0 held-out evaluation (`--eval-start-cache`): the one place it lives.

Runs that differ only after the warm start (a sweep's arms of one seed) start from identical weights, so
their step-0 evaluation is identical: the first run writes it, the others read it. The file's name is a
hash of the warm-start cache entry (which identifies the starting weights: `setup.warm_start_cache_dir`)
and of every setting the evaluation depends on. The sweep (lpreg.experiments.compare) waits for these
files; the trainer reads and writes them (lpreg.trainer.step.start_eval).
"""

import hashlib
import json
import os
from typing import Optional

from lpreg.trainer.setup import warm_start_cache_dir

__all__ = ["EVAL_KEYS", "eval_start_cache_file", "read_cached", "write_cached"]

# every config field the step-0 evaluation depends on, besides the starting weights
EVAL_KEYS = ("seed", "eval_problems", "eval_k", "eval_data", "temperature", "max_new_tokens", "micro_batch_size",
             "dtype", "torch_threads")


def eval_start_cache_file(cfg) -> Optional[str]:
    """The --eval-start-cache file of this run's step-0 evaluation (module docstring); None when
    --eval-start-cache or --warm-start-cache is unset."""
    ws = warm_start_cache_dir(cfg) if cfg.eval_start_cache else None
    if ws is None:
        return None
    key = json.dumps({"warm_start": os.path.basename(ws), **{k: getattr(cfg, k) for k in EVAL_KEYS}}, sort_keys=True)
    return os.path.join(cfg.eval_start_cache, hashlib.sha256(key.encode()).hexdigest()[:16] + ".json")


def read_cached(path: Optional[str]) -> Optional[dict]:
    """The cached evaluation at `path` ({"row": metrics row, "correct": per-problem correct counts}), or
    None when there is none (or it is an older entry without per-problem counts)."""
    if path is None or not os.path.isfile(path):
        return None
    with open(path) as fh:
        entry = json.load(fh)
    return entry if isinstance(entry, dict) and "row" in entry and "correct" in entry else None


def write_cached(path: str, entry: dict) -> None:
    """Write `entry` atomically: a concurrent run of the same seed writes the same entry."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump(entry, fh)
    os.replace(tmp, path)
