"""Will Lp-Reg act on my model? `lpreg.diagnose` and the `lpreg-diagnose` command (docs/diagnose.md).

    result = lpreg.diagnose("path/to/model", data="prompts.jsonl", samples=8, tokens_per_call=4096)
    print(result.verdict)        # e.g. "m = 0.988: the push 1/m - 1 = 0.0121 is ~1.2% of ..."
    result.to_dict()             # the figures as JSON types; result.save_heatmap("grid.png")

It samples G completions per prompt as the trainer does, scores them with the trainer's reward, computes
group advantages, runs lpreg's token statistics and Lp-Reg's selection call by call, and reports at the
user's kappa, rho, form and mode, and over a grid of kappa x rho. Modules, one job each: options (the
settings, validated), load (model and prompts), sample, measure, examples, verdict, report, cli.

This package's import is light (`import lpreg` imports it): torch's model code, transformers, tqdm and
matplotlib load when `diagnose` runs.
"""

from typing import TYPE_CHECKING, Optional, Sequence, Tuple, Union

from lpreg.diagnosis.options import DEFAULT_RHOS, DEFAULT_THRESHOLDS, Settings

if TYPE_CHECKING:
    from lpreg.diagnosis.report import Diagnosis
    from lpreg.trainer.problem import Problem

__all__ = ["diagnose", "Settings"]


def diagnose(
    model: str,
    *,
    data: Optional[str] = None,
    problems: Optional[Sequence[Union["Problem", Tuple[str, str]]]] = None,
    prompts: int = 32,
    samples: int = 8,
    temperature: float = 1.0,
    max_new_tokens: int = 256,
    tokens_per_call: int = 4096,
    threshold: float = 0.02,
    rho: float = 0.01,
    compat: str = "released",
    mode: str = "min_p",
    beta: float = 1.0,
    reward: str = "math-verify",
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    rhos: Sequence[float] = DEFAULT_RHOS,
    examples: int = 20,
    seed: int = 0,
    backend: str = "auto",
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = False,
) -> "Diagnosis":
    """Measure what Lp-Reg would do on `model` with these prompts and settings.

    Args:
        model: a local Hugging Face model directory (with its tokenizer), or an `lpreg-train` checkpoint
            (`<run>/checkpoints/step_N`, or the run directory: its newest complete checkpoint), loaded as the
            trainer loads it (its output transform included).
        data: a .jsonl or .parquet file of questions and answers in the trainer's formats
            (`lpreg.trainer.data`); every row must have both. Give `data` or `problems`, not both.
        problems: `Problem`s or (question, answer) pairs instead of a file.
        prompts: how many prompts to use (the first ones).
        samples: G, completions per prompt (>= 2: advantages are centred within the group).
        temperature: T of the sampling and of the statistics, as in training.
        max_new_tokens: the longest completion.
        tokens_per_call: response tokens per loss call (the micro-batch): the released form selects
            k = int(rho * n_neg) of a call's n_neg negative-advantage tokens, and nothing when k <= 1.
        threshold: kappa, the proxy's filter: min_p keeps p_i >= kappa max p (in (0, 1]); fixed keeps
            p_i >= kappa (in (0, 1)).
        rho: the lowest-probability share eligible for the penalty, in (0, 1].
        compat: "released" (the authors' code, k3) or "paper" (Eq. 6, the full KL).
        mode: "min_p" or "fixed".
        beta: the penalty's weight (scales the push against the negative-advantage update).
        reward: "math-verify" (the trainer's reward) or "exact" (exact match of the extracted answer).
        thresholds: the grid's kappas (the user's `threshold` is always added).
        rhos: the grid's rhos (the user's `rho` is always added).
        examples: how many selected tokens to show in context.
        seed: sampling seed (each prompt's group is seeded from it and the prompt's index).
        backend: lpreg's token-statistics backend ("auto", "triton", "torch", "cpu", "cuda").
        device: "auto" (CUDA when present), "cpu", "cuda", "cuda:1", ...
        dtype: the model's dtype: "auto" (bfloat16 on a GPU, float32 on the CPU), "float32", "bfloat16",
            "float16".
        progress: show progress bars (tqdm, on stderr).

    Returns:
        A `Diagnosis`: `.cell` (the figures at the user's settings), `.grid`, `.examples`, `.verdict`,
        `.to_dict()`, `.to_text()`, `.save_heatmap(path)`.

    Raises:
        ValueError: naming the field: a setting out of range, a model directory without config.json or a
            tokenizer, a data file with a row lacking a question or an answer (its line), no prompts.
    """
    settings = Settings(threshold=threshold, rho=rho, compat=compat, mode=mode, beta=beta,
                        tokens_per_call=tokens_per_call, samples=samples, temperature=temperature,
                        max_new_tokens=max_new_tokens, prompts=prompts, reward=reward, thresholds=tuple(thresholds),
                        rhos=tuple(rhos), examples=examples, seed=seed, backend=backend, device=device, dtype=dtype)
    # imported here: `import lpreg` must not import transformers (these modules do)
    from lpreg.diagnosis.run import run

    return run(model, settings, data=data, problems=problems, progress=progress)
