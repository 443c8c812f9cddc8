"""The instruments for studying Lp-Reg with the trainer: a study task, per-step probes, the sweep and
its statistics. The trainer (`lpreg.trainer`) never imports this package; it registers here, through
the trainer's own registration points, when imported (`lpreg-train` and `python -m lpreg.train` do):

    tasks "sparks", "noisy-sparks"   lpreg.trainer.tasks.register_task   (sparks.py, noisy_sparks.py)
    presets cpu-sparks, cpu-sweep, cpu-sparks-demo (sparks); cpu-demo, cpu-regime-sweep (noisy-sparks)
                             lpreg.trainer.config.register_preset   (presets.py)
    instrument "diversity"   lpreg.trainer.instruments.register_instrument: spark/prob, spark/usage,
                             train/distinct_answers in every metrics.jsonl row (diversity.py)
    instrument "mechanism"   the same: the `--mechanism-every` probe before the update, mechanism.jsonl
                             and its lines of the end-of-run summary (mechanism.py)

    sparks.py            the `sparks` task: a 3,000-token BPE vocabulary (a noise tail) and a rare
                         valuable "check" token
    noisy_sparks.py      the `noisy-sparks` task: sparks with a noise floor of 25% that min-p removes (a
                         fixed output floor, random tokens in the warm start) and a pool of ~8,000
                         training problems: the paper's regime
    presets.py           the presets of the study (above)
    diversity.py         per-step spark probability / usage and distinct answers per group
    mechanism.py         Lp-Reg's mechanism, measured: one update at beta = 1 and one at beta = 0 from
                         the same state, p_y after / before for the selected tokens
    spark_value.py       `python -m lpreg.experiments.spark_value`: is the spark rare and valuable after
                         the warm start (the cpu-sparks design check)
    compare.py           `python -m lpreg.experiments.compare`: arms x seeds on one preset, a band figure,
                         a JSON summary, the paired table (the sweep)
    paired.py            paired statistics over seeds: bootstrap interval, exact Wilcoxon signed-rank
    mechanism_report.py  a sweep's mechanism probes pooled over seeds, and their figure

Importing this package twice registers once (Python imports a module once); `register()` may be
called again to restore the entries after a test replaced them.
"""

from lpreg.experiments import diversity, mechanism, noisy_sparks, presets, sparks
from lpreg.trainer.config import register_preset
from lpreg.trainer.instruments import Instrument, register_instrument
from lpreg.trainer.tasks import BuiltinTask, register_task

__all__ = ["register"]


def register() -> None:
    """Register the study's task, presets and instruments with the trainer."""
    register_task("sparks", BuiltinTask(split_problems=sparks.sparks_split, tokenizer=sparks.sparks_tokenizer,
                                        spark_tokens=(sparks.SPARK,), warm_start_extra=sparks.warm_start_drills))
    register_task("noisy-sparks", BuiltinTask(
        split_problems=noisy_sparks.noisy_split, tokenizer=sparks.sparks_tokenizer, spark_tokens=(sparks.SPARK,),
        warm_start_extra=sparks.warm_start_drills, warm_start_noise=noisy_sparks.NOISE,
        output_floor=noisy_sparks.FLOOR))
    for name, fields in presets.PRESETS.items():
        register_preset(name, **fields)
    register_instrument(Instrument("diversity", step_metrics=diversity.step_metrics))
    register_instrument(Instrument("mechanism", before_update=mechanism.probe, log_file=mechanism.LOG_FILE,
                                   summary=mechanism.summary_lines))


register()
