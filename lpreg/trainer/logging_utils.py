"""Run outputs: metrics.jsonl (one row per step), samples.jsonl, PNG plots, a progress bar.

Resume safety: `MetricsLog(path, resume_step=s)` rewrites metrics.jsonl keeping only the rows
with step <= s (the checkpoint's step), atomically, so after a crash and a resume every step
appears exactly once. samples.jsonl is trimmed the same way.
"""

import json
import math
import os

__all__ = ["MetricsLog", "read_metrics", "truncate_jsonl", "plot_metrics", "plot_bands", "progress_bar", "format_row",
           "pyplot", "save_figure"]


def read_metrics(path) -> list[dict]:
    rows: list[dict] = []
    if not os.path.exists(path):
        return rows
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line from a killed run: ignore it and everything after
    return rows


def truncate_jsonl(path, resume_step) -> None:
    """Keep rows with step <= resume_step; atomic replace so a crash here loses nothing."""
    if not os.path.exists(path):
        return
    rows = [r for r in read_metrics(path) if int(r.get("step", 0)) <= resume_step]
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class MetricsLog:
    """Appends one JSON row per call; flushed and fsync'ed so a killed run keeps what it logged."""

    def __init__(self, path, *, resume_step=None):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if resume_step is None:
            if os.path.exists(path):
                os.remove(path)  # a fresh run in a reused directory starts a fresh log
        else:
            truncate_jsonl(path, resume_step)
        self._fh = open(path, "a")

    def write(self, row):
        self._fh.write(json.dumps(_jsonable(row)) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self):
        self._fh.close()


def _jsonable(row):
    out = {}
    for k, v in row.items():
        if hasattr(v, "item"):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            v = None if math.isnan(v) else (1e308 if v > 0 else -1e308)
        out[k] = v
    return out


def format_row(row, keys=("critic/score/mean", "actor/entropy", "actor/pg_loss", "actor/lpreg_frac",
                          "response_length/mean", "timing/step_s")) -> str:
    parts = [f"step {row['step']}"]
    for k in keys:
        if k in row and row[k] is not None:
            parts.append(f"{k.split('/', 1)[-1]} {row[k]:.4g}")
    return " | ".join(parts)


def progress_bar(total, initial, enabled) -> object:
    """A tqdm bar with ETA over RL steps (a no-op object when disabled or tqdm is missing)."""
    if enabled:
        try:  # imported here: tqdm is needed only for a bar on a terminal, and may be missing
            from tqdm.auto import tqdm

            return tqdm(total=total, initial=initial, desc="rl", unit="step", dynamic_ncols=True)
        except ImportError:
            pass

    class _Null:
        def update(self, n=1):
            pass

        def set_postfix(self, *a, **k):
            pass

        def write(self, s):
            print(s, flush=True)

        def close(self):
            pass

    return _Null()


def _smooth(values, window):
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


PLOT_KEYS = (("critic/score/mean", "reward (mean score)"), ("actor/entropy", "policy entropy (nats/token)"),
             ("actor/lpreg_frac", "Lp-Reg selected fraction"))


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend. Imported here, not at the top: matplotlib is
    a heavy import that only the end of a run (and the sweep) needs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(plt, fig, path: str, title) -> str:
    """Title, lay out and write `fig` as a PNG at `path` (its folder created); returns the path."""
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_metrics(runs, path, *, keys=PLOT_KEYS, title=None, smooth=5) -> str:
    """runs: {label: list of metric rows}. One panel per key, one line per run (raw, faint, and
    a moving average). Writes a small PNG at `path`; returns the path."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), dpi=90)
    axes = axes if len(keys) > 1 else [axes]
    for ax, (key, label) in zip(axes, keys):
        for i, (name, rows) in enumerate(runs.items()):
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if not pts:
                continue
            xs, ys = zip(*pts)
            color = f"C{i}"
            ax.plot(xs, ys, color=color, alpha=0.25, linewidth=1)
            ax.plot(xs, _smooth(ys, smooth), color=color, linewidth=2, label=name)
        ax.set_xlabel("RL step")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return save_figure(plt, fig, path, title)


def plot_bands(runs, path, *, keys, title=None, ncols=4, smooth=5) -> str:
    """runs: {label: [rows of seed 0, rows of seed 1, ...]}. One panel per (key, title) in `keys`:
    per step, the mean over the seeds that logged the key (bold) and a band from their lowest to
    their highest value, each a trailing `smooth`-point moving average (every step sees other
    prompts, so raw per-step values vary; held-out evaluations are sparse and drawn raw).
    A key no run logged (a study metric of another task, a run without held-out evaluation) gets no
    panel. Writes a PNG at `path`; returns the path."""
    plt = pyplot()
    logged = [(key, label) for key, label in keys
              if any(r.get(key) is not None for seeds in runs.values() for rows in seeds for r in rows)]
    keys = logged or list(keys)[:1]
    nrows = -(-len(keys) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.9 * nrows), dpi=90, squeeze=False)
    for ax, (key, label) in zip(axes.flat, keys):
        for i, (name, seeds) in enumerate(runs.items()):
            by_step: dict[int, list[float]] = {}
            for rows in seeds:
                for r in rows:
                    if r.get(key) is not None:
                        by_step.setdefault(r["step"], []).append(float(r[key]))
            if not by_step:
                continue
            xs = sorted(by_step)
            w = smooth if len(xs) >= 15 else 1
            mean = _smooth([sum(by_step[x]) / len(by_step[x]) for x in xs], w)
            ax.fill_between(xs, _smooth([min(by_step[x]) for x in xs], w), _smooth([max(by_step[x]) for x in xs], w),
                            color=f"C{i}", alpha=0.15, linewidth=0)
            ax.plot(xs, mean, color=f"C{i}", linewidth=1.6, label=name, marker="o" if len(xs) < 15 else None,
                    markersize=3)
        ax.set_xlabel("RL step")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    return save_figure(plt, fig, path, title)
