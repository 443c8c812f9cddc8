"""The trainer's registration point for instruments: measurements a study adds to a step.

The loop knows no instrument by name. A study registers one (`register_instrument`) before the run
starts (a study registers its own when it is imported). Each hook is optional:

    before_update  (run, plan, step) -> metrics-row entries: between the scoring pass and the update,
                   from the state before it ({} when it does not measure this step); it must leave the
                   run untouched (work on copies)
    step_metrics   (run, rollout) -> metrics-row entries, after the update; every rank calls it
    log_file       its own jsonl under output_dir: removed when a run starts afresh, truncated to the
                   checkpoint's step on resume, listed in the end-of-run summary
    summary        (rows of log_file, or of metrics.jsonl without one) -> lines of the end-of-run summary
"""

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from lpreg.trainer.logging_utils import read_metrics

__all__ = ["Instrument", "INSTRUMENTS", "register_instrument", "before_update", "step_metrics", "log_files",
           "summary_lines"]


@dataclass(frozen=True)
class Instrument:
    name: str
    before_update: Optional[Callable[[Any, Any, int], Dict[str, float]]] = None
    step_metrics: Optional[Callable[[Any, Any], Dict[str, float]]] = None
    log_file: str = ""
    summary: Optional[Callable[[List[dict]], List[str]]] = None


INSTRUMENTS: Dict[str, Instrument] = {}


def register_instrument(instrument: Instrument) -> None:
    """Add (or replace) an instrument; the hooks of every instrument run in registration order."""
    INSTRUMENTS[instrument.name] = instrument


def before_update(run, plan, step: int) -> Dict[str, float]:
    """Every instrument's `before_update` entries for this step."""
    out: Dict[str, float] = {}
    for inst in INSTRUMENTS.values():
        if inst.before_update is not None:
            out.update(inst.before_update(run, plan, step))
    return out


def step_metrics(run, ro) -> Dict[str, float]:
    """Every instrument's `step_metrics` entries for this step."""
    out: Dict[str, float] = {}
    for inst in INSTRUMENTS.values():
        if inst.step_metrics is not None:
            out.update(inst.step_metrics(run, ro))
    return out


def log_files() -> List[str]:
    """The instruments' own jsonl file names (under output_dir)."""
    return [inst.log_file for inst in INSTRUMENTS.values() if inst.log_file]


def summary_lines(output_dir: str) -> List[str]:
    """The instruments' lines of the end-of-run summary, each from its own log's rows (metrics.jsonl's
    for an instrument without a log of its own)."""
    lines: List[str] = []
    for inst in INSTRUMENTS.values():
        if inst.summary is not None:
            lines += inst.summary(read_metrics(os.path.join(output_dir, inst.log_file or "metrics.jsonl")))
    return lines
