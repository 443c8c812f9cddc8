"""The one-line verdict: what the figures at the user's settings mean for Lp-Reg on this model.

Read in the order the mechanism fails (docs/diagnose.md):
  1. no negative-advantage token: Lp-Reg acts only on A < 0 responses, so it does nothing;
  2. released form, k = int(rho n_neg) <= 1 in every call: the released code selects nothing at all;
  3. candidates but no selection: the lowest-rho tokens are outside the proxy's kept set (filtered as noise);
  4. selected tokens: the push 1/m - 1 against the negative-advantage update |A| (`Cell.push_ratio`) says how
     hard Lp-Reg pushes back: under 5% it will barely act, under 50% it acts weakly, above that strongly.
Where nothing is selected, the grid's nearest cell that does select is named.
"""

import math
from typing import List, Optional

from lpreg.diagnosis.measure import Cell
from lpreg.diagnosis.options import Settings

WEAK, STRONG = 0.05, 0.5  # push ratios: below WEAK Lp-Reg barely acts, above STRONG it dominates the update


def _nearest(cell: Cell, grid: List[Cell]) -> str:
    """The grid's cell nearest to the user's (in log kappa and log rho) that selects something."""
    def distance(c: Cell) -> float:
        return abs(math.log(c.threshold / cell.threshold)) + abs(math.log(c.rho / cell.rho))

    selecting = sorted((c for c in grid if c.selected), key=distance)
    if not selecting:
        return "; no cell of the grid selects anything"
    c = selecting[0]
    return (f"; the nearest cell that selects, kappa = {c.threshold:g} and rho = {c.rho:g}, selects "
            f"{c.selected_per_1000:.3g} per 1,000 tokens (m = {c.kept_mass:.3f})")


def verdict(cell: Cell, grid: List[Cell], settings: Settings, *, frac_equal_groups: float,
            short_of_one_call: Optional[int] = None) -> str:
    """One line; `short_of_one_call`: the sampled tokens when they are fewer than one call holds."""
    note = (f" (only {short_of_one_call} response tokens were sampled, fewer than one call of "
            f"{settings.tokens_per_call}: sample more prompts)") if short_of_one_call is not None else ""
    if cell.response_tokens == 0:
        return "nothing to measure: no response token was sampled"
    if cell.negative_tokens == 0:
        return (f"nothing selected: no response has a negative advantage ({frac_equal_groups:.0%} of the groups got "
                f"equal rewards); Lp-Reg acts only on A < 0 responses: use prompts the model sometimes solves")
    if cell.selected == 0:
        if settings.compat == "released" and cell.calls_selecting == 0:
            per_call = cell.negative_tokens / max(1, cell.calls)
            return (f"nothing selected: k = int(rho * n_neg) <= 1 in every call (n_neg = {per_call:.0f} negative-"
                    f"advantage tokens per call of {settings.tokens_per_call}, rho = {settings.rho:g}), and the "
                    f"released form then selects nothing; raise rho or the tokens per call{note}"
                    + _nearest(cell, grid))
        share = cell.filtered_share or 0.0
        if share >= 1.0:
            return (f"nothing selected: the lowest {100 * settings.rho:.3g}% ({cell.candidates} candidates) are all "
                    f"filtered as noise (p_y < kappa max p); raise rho or lower kappa{note}" + _nearest(cell, grid))
        return (f"nothing selected: {share:.0%} of the {cell.candidates} candidates are filtered and at the rest "
                f"the proxy keeps the whole distribution (m = 1: no push); raise kappa{note}" + _nearest(cell, grid))
    assert cell.kept_mass is not None and cell.push is not None and cell.push_ratio is not None
    ratio = cell.push_ratio
    strength = ("Lp-Reg will barely act on this model" if ratio < WEAK else
                "Lp-Reg acts, weakly" if ratio < STRONG else "Lp-Reg acts strongly")
    filtered = (f"; {cell.filtered_share:.0%} of the candidates are filtered as noise"
                if cell.filtered_share else "")
    # the paper form's full KL pushes the selected logit by only p_y (1/m - 1) (docs/spec.md §3a)
    push = (f"the push 1/m - 1 = {cell.push:.3g}" if settings.compat == "released" else
            f"the full KL's push p_y (1/m - 1) (1/m - 1 = {cell.push:.3g})")
    return (f"m = {cell.kept_mass:.3f}: {push} is ~{ratio:.1%} of the negative-advantage gradient at the "
            f"{cell.selected_per_1000:.3g} selected tokens per 1,000 ({strength}){filtered}{note}")
