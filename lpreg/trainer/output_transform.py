"""Registered output transforms: a change of the policy's next-token distribution that is part of the policy.

A transform is installed on a model (typically a forward hook on its LM head) by a function
`install(model, **params) -> None` registered under a name (`register_output_transform`). The trainer
applies the one `--output-transform NAME:key=value,...` names (`apply_output_transform`), and records it in
the model's config as `lpreg_output_transform = {"name", "module", "params"}`, so that every
`save_pretrained` (checkpoints, the warm-start cache, `python -m lpreg.trainer.sft`) writes it into
config.json beside the weights. A checkpoint then is the policy that produced its numbers: `load_policy`
(`lpreg-eval`, `--model`) and resume reinstall it (`restore_output_transform`).

The code that defines a transform is imported only when a checkpoint or a config names it: when the name
is not registered yet, the module recorded with it is imported (it registers the name on import). A
checkpoint is data, so only lpreg's own modules are imported this way; a transform defined elsewhere must
be registered (its module imported) before the checkpoint is loaded. An unknown name is a ValueError
naming it.

Plain transformers (`AutoModelForCausalLM.from_pretrained`) ignores the key: a checkpoint with a transform
loaded outside lpreg is the model without it.
"""

import importlib
import json
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

__all__ = ["CONFIG_KEY", "OutputTransform", "TRANSFORMS", "register_output_transform", "parse_spec",
           "apply_output_transform", "restore_output_transform", "saved_transform", "resolve"]

CONFIG_KEY = "lpreg_output_transform"  # the model config's entry (config.json)
_INSTALLED = "_lpreg_output_transform_installed"  # set on a model whose transform is in place
_OWN_PACKAGE = __name__.split(".")[0]  # the only package whose modules a checkpoint may name


@dataclass(frozen=True)
class OutputTransform:
    name: str
    install: Callable[..., None]  # (model, **params) -> None
    module: str  # where `install` is defined: imported when a checkpoint names `name` unregistered


TRANSFORMS: Dict[str, OutputTransform] = {}


def register_output_transform(name: str, install: Callable[..., None]) -> None:
    """Add (or replace) the transform `name`; `install(model, **params)` changes `model` in place and
    raises ValueError for bad params. Its module is recorded with every checkpoint that uses it."""
    if not name or ":" in name or "," in name:
        raise ValueError(f"register_output_transform: name must be non-empty without ':' or ',', got {name!r}")
    TRANSFORMS[name] = OutputTransform(name=name, install=install, module=install.__module__)


def parse_spec(spec: str, *, flag: str = "--output-transform") -> Tuple[str, Dict[str, Any]]:
    """"NAME" or "NAME:key=value,key=value" -> (NAME, params); each value is read as JSON when it parses
    (0.25, 3, true, "x"), else kept as text. Raises ValueError naming `flag` and the spec."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    if not name:
        raise ValueError(f"{flag} must be NAME or NAME:key=value,...; got {spec!r}")
    params: Dict[str, Any] = {}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, eq, text = item.partition("=")
        if not eq or not key.strip().isidentifier():
            raise ValueError(f"{flag} must be NAME or NAME:key=value,...; got {spec!r} (bad item {item!r})")
        try:
            params[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            params[key.strip()] = text.strip()
    return name, params


def resolve(name: str, module: Optional[str] = None, *, source: str = "--output-transform") -> OutputTransform:
    """The registered transform `name`; when it is not registered, `module` (an lpreg module) is imported
    first, or the one `lpreg.trainer.registry.register_lazy` lists. Raises ValueError naming `name` and
    `source` when it stays unknown."""
    from lpreg.trainer import registry  # a module without dependencies: here to keep this file's top light

    if name not in TRANSFORMS and module:
        if module.split(".")[0] != _OWN_PACKAGE:
            raise ValueError(f"{source} names the output transform {name!r} from module {module!r}, which is not "
                             f"registered; lpreg imports only its own modules for a checkpoint: import {module!r} "
                             f"(it registers {name!r}) before loading")
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ValueError(f"{source} names the output transform {name!r}, defined in {module!r}, which cannot "
                             f"be imported ({err})") from err
    if not registry.ensure("output_transform", name, TRANSFORMS):
        raise ValueError(f"{source} names an unknown output transform {name!r}"
                         f"{f' (module {module!r} did not register it)' if module else ''}; "
                         f"registered: {sorted(TRANSFORMS)}")
    return TRANSFORMS[name]


def saved_transform(config: Any) -> Optional[Dict[str, Any]]:
    """The transform a model config records ({"name", "module", "params"}), or None."""
    entry = getattr(config, CONFIG_KEY, None)
    if entry is None:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) \
            or not isinstance(entry.get("params", {}), dict):
        raise ValueError(f"the model config's {CONFIG_KEY} must be {{'name', 'module', 'params'}}, got {entry!r}")
    return {"name": entry["name"], "module": entry.get("module"), "params": dict(entry.get("params", {}))}


def apply_output_transform(model: Any, spec: str, *, source: str = "--output-transform") -> Any:
    """Install the transform `spec` names ("NAME:key=value,...", `parse_spec`) on `model` and record it
    in `model.config`. A model that already carries the same transform is left as it is; another one
    is a ValueError (a policy has one output distribution)."""
    name, params = parse_spec(spec, flag=source)
    entry = resolve(name, source=source)
    return _install(model, {"name": name, "module": entry.module, "params": params}, source)


def restore_output_transform(model: Any, *, source: str = "the checkpoint") -> Any:
    """Reinstall the transform `model.config` records (a model loaded from a checkpoint); no-op without."""
    saved = saved_transform(model.config)
    return model if saved is None else _install(model, saved, source)


def _install(model: Any, entry: Dict[str, Any], source: str) -> Any:
    installed = getattr(model, _INSTALLED, None)
    if installed is not None:
        if (installed["name"], installed["params"]) != (entry["name"], entry["params"]):
            raise ValueError(f"{source}: the policy already has the output transform {installed['name']!r} "
                             f"{installed['params']}, not {entry['name']!r} {entry['params']}")
        return model
    transform = resolve(entry["name"], entry.get("module"), source=source)
    try:
        transform.install(model, **entry["params"])
    except TypeError as err:  # a parameter the transform does not take
        raise ValueError(f"{source}: output transform {entry['name']!r}: {err}") from err
    record = {"name": entry["name"], "module": transform.module, "params": dict(entry["params"])}
    setattr(model.config, CONFIG_KEY, record)
    setattr(model, _INSTALLED, record)
    return model
