"""One diagnosis, start to end: inputs checked first (cheap errors before a model loads), then sample,
measure at every cell of the grid, pick the examples, and say what it means."""

import contextlib
from typing import Iterator, Optional, Sequence

from lpreg.diagnosis.examples import selected_examples
from lpreg.diagnosis.load import load_model, load_prompts, model_directory, resolve_device, resolve_dtype
from lpreg.diagnosis.measure import measure_cell, split_calls, token_statistics
from lpreg.diagnosis.options import Settings
from lpreg.diagnosis.report import Diagnosis
from lpreg.diagnosis.sample import sample
from lpreg.diagnosis.verdict import verdict


class _Bar:
    """A tqdm bar on stderr, or nothing."""

    def __init__(self, bar) -> None:
        self._bar = bar

    def tick(self) -> None:
        if self._bar is not None:
            self._bar.update(1)


@contextlib.contextmanager
def _bar(total: int, desc: str, enabled: bool) -> Iterator[_Bar]:
    if not enabled:
        yield _Bar(None)
        return
    from tqdm.auto import tqdm  # imported here: a bar only when asked for

    bar = tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False)
    try:
        yield _Bar(bar)
    finally:
        bar.close()


def run(model: str, settings: Settings, *, data: Optional[str], problems: Optional[Sequence],
        progress: bool) -> Diagnosis:
    """`lpreg.diagnose` with validated settings."""
    s = settings
    chosen = load_prompts(data, problems, s.prompts)
    model_directory(model)  # a bad path is refused before the device is touched
    device = resolve_device(s.device)
    policy, tokenizer = load_model(model, device=device, dtype=resolve_dtype(s.dtype, device))
    with _bar(len(chosen), "sampling", progress) as bar:
        samples = sample(policy, tokenizer, chosen, samples=s.samples, temperature=s.temperature,
                         max_new_tokens=s.max_new_tokens, seed=s.seed, reward=s.reward, on_prompt=bar.tick)
    lengths = [len(r) for r in samples.responses]
    calls = split_calls(lengths, s.tokens_per_call)
    kappas, rhos = s.grid
    with _bar(len(calls), "measuring", progress) as bar:
        tokens = token_statistics(policy, samples, calls, thresholds=kappas, mode=s.mode, temperature=s.temperature,
                                  backend=s.backend, on_call=bar.tick)
    grid, mine = [], None
    for k in kappas:
        for r in rhos:
            cell, selected, kept = measure_cell(tokens, k, r, compat=s.compat, beta=s.beta)
            grid.append(cell)
            if k == s.threshold and r == s.rho:
                mine = (cell, selected, kept)
    assert mine is not None  # Settings puts the user's cell in the grid
    cell, selected, kept = mine
    total = sum(lengths)
    line = verdict(cell, grid, s, frac_equal_groups=samples.frac_equal_groups,
                   short_of_one_call=total if total < s.tokens_per_call else None)
    return Diagnosis(
        model=model, settings=s, prompts=len(chosen), sequences=len(samples.responses),
        mean_reward=sum(samples.rewards) / max(1, len(samples.rewards)), frac_equal_groups=samples.frac_equal_groups,
        cell=cell, grid=grid,
        examples=selected_examples(tokens, selected, kept, s.threshold, samples, tokenizer, limit=s.examples),
        verdict=line, device=str(device),
    )
