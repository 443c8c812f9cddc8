"""The trainer's registration points for presets and options, and the lazy table of who registers what.

It imports nothing of lpreg, so that any module (the trainer's own presets in lpreg/trainer/presets.py, a
study's in lpreg.experiments) can register here without importing the config, and the config can import
those modules without a cycle.

    register_preset(name, **fields)          a `--preset NAME`: TrainConfig fields and registered options
                                             (names are checked by lpreg.trainer.config, at its import and
                                             when a preset is used)
    register_option(name, default=, help=, check=)
                                             a setting a study adds to the config (`--NAME` flag, YAML key,
                                             preset field, `preset_config(..., NAME=value)`), read with
                                             `cfg.option(NAME)`; `check(cfg)` raises ValueError for a bad one
    register_lazy(kind, name, module)        `name` of `kind` ("preset", "task", "option",
                                             "output_transform") is registered by importing `module`, which
                                             the trainer does the first time the name is asked for
                                             (`ensure`). The command line (lpreg/train.py) lists the study's
                                             names this way, so `lpreg-train` loads no study code unless a
                                             study name is asked for.
"""

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

__all__ = ["PRESETS", "OPTIONS", "LAZY", "KINDS", "Option", "register_preset", "register_option", "register_lazy",
           "ensure"]

KINDS = ("preset", "task", "option", "output_transform")

# name -> TrainConfig fields (and registered options); the config's built-in presets are added by
# lpreg.trainer.config, the trainer's main jobs by lpreg.trainer.presets
PRESETS: Dict[str, Dict[str, Any]] = {}


@dataclass(frozen=True)
class Option:
    """A setting a study adds to the trainer's config (`register_option`)."""

    name: str
    default: Any  # also fixes the flag's type (bool, int, float or str)
    help: str = ""
    check: Optional[Callable[[Any], None]] = None  # (TrainConfig) -> None, ValueError naming --NAME when bad


OPTIONS: Dict[str, Option] = {}
LAZY: Dict[Tuple[str, str], str] = {}


def register_preset(name: str, **fields: Any) -> None:
    """Add (or replace) the preset `name` (`--preset NAME`): `fields` are TrainConfig fields or
    registered options."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_preset: name must be a non-empty string, got {name!r}")
    PRESETS[name] = dict(fields)


def register_option(name: str, *, default: Any, help: str = "",
                    check: Optional[Callable[[Any], None]] = None) -> None:
    """Add (or replace) a config option (module docstring). Its name must be a Python identifier and
    its default a bool, int, float or str."""
    if not name.isidentifier():
        raise ValueError(f"register_option: name must be an identifier, got {name!r}")
    if not isinstance(default, (bool, int, float, str)):
        raise ValueError(f"register_option({name!r}): default must be a bool, int, float or str, got {default!r}")
    OPTIONS[name] = Option(name=name, default=default, help=help, check=check)


def register_lazy(kind: str, name: str, module: str) -> None:
    """Record that importing `module` registers `name` of `kind` (one of KINDS)."""
    if kind not in KINDS:
        raise ValueError(f"register_lazy: kind must be one of {KINDS}, got {kind!r}")
    LAZY[(kind, name)] = module


def ensure(kind: str, name: str, table: Dict[str, Any]) -> bool:
    """Whether `name` is in `table` (the registry of `kind`), after importing the module that
    `register_lazy` lists for it when it is not there yet."""
    if name not in table and (kind, name) in LAZY:
        importlib.import_module(LAZY[(kind, name)])
    return name in table
