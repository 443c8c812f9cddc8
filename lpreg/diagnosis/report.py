"""The diagnosis' result and its three renderings: a dict (JSON for scripts), text for a terminal, and a PNG
heatmap of the kappa x rho grid (matplotlib, imported when a heatmap is asked for)."""

import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from lpreg.diagnosis.measure import Cell
from lpreg.diagnosis.options import Settings


@dataclass
class Diagnosis:
    """What `lpreg.diagnose` found.

    cell: the figures at the user's kappa, rho, form and mode; grid: every (kappa, rho) of the grid;
    examples: the selected tokens at the user's settings, in context; verdict: one line saying what it means.
    """

    model: str
    settings: Settings
    prompts: int
    sequences: int
    mean_reward: float
    frac_equal_groups: float
    cell: Cell
    grid: List[Cell]
    examples: List[dict]
    verdict: str
    device: str

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON types only (None for a mean over no selected token)."""
        s = self.settings
        return {
            "model": self.model, "device": self.device, "verdict": self.verdict,
            "settings": {"threshold": s.threshold, "rho": s.rho, "compat": s.compat, "mode": s.mode, "beta": s.beta,
                         "tokens_per_call": s.tokens_per_call, "samples": s.samples, "temperature": s.temperature,
                         "max_new_tokens": s.max_new_tokens, "reward": s.reward, "seed": s.seed,
                         "backend": s.backend},
            "prompts": self.prompts, "sequences": self.sequences, "mean_reward": self.mean_reward,
            "frac_equal_groups": self.frac_equal_groups,
            **self.cell.to_dict(),
            "examples": self.examples,
            "grid": [c.to_dict() for c in self.grid],
        }

    def to_text(self) -> str:
        """The report a person reads: the user's figures, the selected tokens, the grid, the verdict."""
        c, s = self.cell, self.settings
        lines = [
            f"lpreg-diagnose {self.model} ({self.device})",
            f"  {self.prompts} prompts x {s.samples} samples at T = {s.temperature:g}: {c.response_tokens} response "
            f"tokens, {c.negative_tokens} with A < 0; mean reward {self.mean_reward:.3f}, "
            f"{self.frac_equal_groups:.0%} of groups all-equal",
            f"  at kappa = {s.threshold:g} ({s.mode}), rho = {s.rho:g}, compat = {s.compat}, {c.calls} call(s) of "
            f"<= {s.tokens_per_call} tokens ({c.calls_selecting} can select):",
            f"    selected per 1,000 response tokens  {c.selected_per_1000:.3g}  ({c.selected} tokens)",
            f"    candidates filtered as noise        {_pct(c.filtered_share)}  ({c.filtered} of {c.candidates})",
            f"    kept mass m at the selected tokens  {_num(c.kept_mass, '.4f')}",
            f"    push 1/m - 1                        {_num(c.push, '.4g')}",
            f"    p_y at the selected tokens          {_num(c.p_y, '.3g')}",
            f"    push / negative-advantage update    {_pct(c.push_ratio)}",
        ]
        if self.examples:
            lines.append(f"  selected tokens (rarest first, {len(self.examples)} of {c.selected}):")
            for e in self.examples:
                context = e["context"].replace("\n", "\\n")
                question = e["question"] if len(e["question"]) <= 40 else "..." + e["question"][-37:]
                lines.append(f"    p_y {e['p_y']:.2e}  m {e['kept_mass']:.3f}  A {e['advantage']:+.2f}  "
                             f"{context!r}  (after {question!r})")
        lines.append(f"  grid (selected per 1,000 tokens / filtered share / kept mass), compat = {s.compat}:")
        lines += ["    " + row for row in grid_table(self.grid)]
        lines.append(f"verdict: {self.verdict}")
        return "\n".join(lines)

    def save_heatmap(self, path: str) -> None:
        """Two panels over kappa x rho: selected tokens per 1,000, and the push 1/m - 1 (blank: none selected)."""
        name = os.path.basename(os.path.normpath(self.model))
        save_heatmap(self.grid, path, title=f"{name} ({self.settings.compat}, {self.settings.mode})")


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.1%}"


def _num(x: Optional[float], fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _axes(grid: List[Cell]):
    return sorted({c.threshold for c in grid}), sorted({c.rho for c in grid})


def grid_table(grid: List[Cell]) -> List[str]:
    """Rows of kappa, columns of rho; each entry `selected per 1,000 / filtered share / kept mass`."""
    kappas, rhos = _axes(grid)
    at = {(c.threshold, c.rho): c for c in grid}
    width = 20
    rows = ["kappa \\ rho".ljust(12) + "".join(f"{r:<{width}g}" for r in rhos)]
    for k in kappas:
        entries = []
        for r in rhos:
            c = at[(k, r)]
            entries.append(f"{c.selected_per_1000:.3g}/{_pct(c.filtered_share)}/{_num(c.kept_mass, '.3f')}"
                           .ljust(width))
        rows.append(f"{k:<12g}" + "".join(entries))
    return rows


def save_heatmap(grid: List[Cell], path: str, *, title: str = "") -> None:
    """Write the grid's heatmap as a PNG at `path`."""
    import matplotlib  # imported here: only a heatmap needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kappas, rhos = _axes(grid)
    at = {(c.threshold, c.rho): c for c in grid}
    panels = [("selected per 1,000 response tokens", lambda c: c.selected_per_1000, ".3g"),
              ("push 1/m - 1 at the selected tokens", lambda c: c.push if c.push is not None else math.nan, ".3g")]
    fig, axes = plt.subplots(1, 2, figsize=(5 + 1.3 * len(rhos), 1.5 + 0.6 * len(kappas)), squeeze=False)
    for ax, (name, value, fmt) in zip(axes[0], panels):
        data = [[value(at[(k, r)]) for r in rhos] for k in kappas]
        image = ax.imshow(data, cmap="viridis", aspect="auto", origin="lower")
        finite = [v for row in data for v in row if not math.isnan(v)]
        middle = (min(finite) + max(finite)) / 2 if finite else 0.0
        for i in range(len(kappas)):
            for j in range(len(rhos)):
                v = data[i][j]  # dark text on the bright half of the colour map
                ax.text(j, i, "-" if math.isnan(v) else format(v, fmt), ha="center", va="center",
                        color="k" if not math.isnan(v) and v > middle else "w", fontsize=8)
        ax.set_xticks(range(len(rhos)), [f"{r:g}" for r in rhos])
        ax.set_yticks(range(len(kappas)), [f"{k:g}" for k in kappas])
        ax.set_xlabel("rho")
        ax.set_ylabel("kappa")
        ax.set_title(name, fontsize=10)
        fig.colorbar(image, ax=ax)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
