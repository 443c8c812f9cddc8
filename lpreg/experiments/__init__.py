"""The instruments for studying Lp-Reg with the trainer: study tasks, a study output transform, per-step
probes, the sweep and its statistics. The trainer (`lpreg.trainer`) never imports this package; it
registers here, through the trainer's own registration points, when imported. `lpreg-train` imports it
only when a study name is asked for (lpreg/train.py lists them: `STUDY_NAMES`), `python -m
lpreg.experiments.compare` always, and `lpreg-eval` when a checkpoint names its output transform:

    tasks "sparks", "noisy-sparks"   lpreg.trainer.tasks.register_task (sparks.py, noisy_sparks.py);
                             noisy-sparks' warm-start noise: register_warm_start_augment (token_noise.py)
    presets cpu-sparks, cpu-sweep, cpu-sparks-demo (sparks); noisy-sparks-demo, cpu-regime-sweep
                             (noisy-sparks)   lpreg.trainer.registry.register_preset (presets.py)
    output transform "output_floor"   lpreg.trainer.output_transform.register_output_transform
                             (output_floor.py): p = (1 - floor) softmax(z) + floor / V
    option "mechanism_every" lpreg.trainer.registry.register_option: `--mechanism-every N`
    instrument "diversity"   lpreg.trainer.instruments.register_instrument: spark/prob, spark/usage,
                             train/distinct_answers in every metrics.jsonl row, p(spark) in the summary
                             (diversity.py)
    instrument "mechanism"   the same: the `--mechanism-every` probe before the update, mechanism.jsonl
                             and its lines of the end-of-run summary (mechanism.py)

    sparks.py            the `sparks` task: a 3,000-token BPE vocabulary (a noise tail) and a rare
                         valuable "check" token
    noisy_sparks.py      the `noisy-sparks` task: sparks with a fixed output floor of 25% that min-p removes,
                         random tokens in the warm start, and a pool of ~8,000 training problems
    output_floor.py      the floor, as an output transform saved with checkpoints
    token_noise.py       random tokens inserted in warm-start answers
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

from dataclasses import asdict

from lpreg.experiments import diversity, mechanism, noisy_sparks, output_floor, presets, sparks, token_noise
from lpreg.trainer.config import register_preset
from lpreg.trainer.instruments import Instrument, register_instrument
from lpreg.trainer.output_transform import register_output_transform
from lpreg.trainer.registry import register_option
from lpreg.trainer.tasks import BuiltinTask, WarmStartAugment, register_task, register_warm_start_augment

__all__ = ["register"]


def register() -> None:
    """Register the study's tasks, transform, option, presets and instruments with the trainer."""
    register_task("sparks", BuiltinTask(split_problems=sparks.sparks_split, tokenizer=sparks.sparks_tokenizer,
                                        warm_start_extra=sparks.warm_start_drills))
    register_task("noisy-sparks", BuiltinTask(split_problems=noisy_sparks.noisy_split,
                                              tokenizer=sparks.sparks_tokenizer,
                                              warm_start_extra=sparks.warm_start_drills))
    # the key is the one the warm-start cache used before the augment was generic (its entries stay valid)
    register_warm_start_augment("noisy-sparks", WarmStartAugment(
        make=lambda tok: token_noise.augment(noisy_sparks.NOISE, tok),
        key={"warm_start_noise": asdict(noisy_sparks.NOISE)}))
    for task in ("sparks", "noisy-sparks"):
        diversity.register_spark_tokens(task, (sparks.SPARK,))
    register_output_transform(output_floor.NAME, output_floor.install)
    register_option(mechanism.OPTION, default=0, help=mechanism.OPTION_HELP, check=mechanism.check_option)
    for name, fields in presets.PRESETS.items():
        register_preset(name, **fields)
    register_instrument(Instrument("diversity", step_metrics=diversity.step_metrics,
                                   summary=diversity.summary_lines))
    register_instrument(Instrument("mechanism", before_update=mechanism.probe, log_file=mechanism.LOG_FILE,
                                   summary=mechanism.summary_lines))


register()
