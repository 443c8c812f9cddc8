"""Atomic checkpoints: a step's full training state, written so a crash never leaves half of one.

Layout: `<output_dir>/checkpoints/step_000040/` holding
    model/            save_pretrained of the (unwrapped) policy, plus its tokenizer
    trainer_state.pt  optimizer, scheduler, RNG states (python, numpy, torch, cuda), step,
                      data position, config: tensors and plain Python values only
    COMPLETE          marker written last

Safe to load: `load_checkpoint` reads trainer_state.pt with `torch.load(weights_only=True)`, which
rebuilds tensors, numbers, strings, None and lists / tuples / dicts of them and refuses anything
else, since unpickling an arbitrary object can run code. The state is written in exactly those
types (the RNG states as tensors and numbers, the config as a dict), so nothing needs
allow-listing, and a file holding anything else is refused with a ValueError naming it.

Atomicity: everything is written into `step_000040.tmp-<pid>/`, each file is fsync'ed, the
marker is written, then the directory is renamed into place with `os.replace` (atomic on one
filesystem) and the parent directory is fsync'ed. A directory without the marker, or a
leftover `.tmp-*`, is never loaded; `latest_checkpoint` ignores it and the next save cleans it.
"""

import dataclasses
import os
import pickle
import random
import re
import shutil
from typing import Tuple, cast

import numpy as np
import torch

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "capture_rng", "restore_rng"]

_STEP_DIR = re.compile(r"^step_(\d+)$")
MARKER = "COMPLETE"
# the keys of trainer_state.pt, all of them (load_checkpoint refuses a file with others or fewer)
STATE_KEYS = frozenset({"step", "data_position", "optimizer", "scheduler", "rng", "config"})


def capture_rng() -> dict:
    """Every RNG stream the trainer draws from, as tensors and numbers (loadable with weights_only)."""
    version, mt, gauss = random.getstate()  # Mersenne Twister: 624 words and a position, each < 2**32
    # the legacy tuple, which the default call returns (numpy's stub types that call as the dict form)
    name, keys, pos, has_gauss, cached = cast(Tuple[str, np.ndarray, int, int, float], np.random.get_state())
    state = {"python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss_next": gauss},
             "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state) -> None:
    """Set every stream `capture_rng` recorded."""
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(path):
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_root(output_dir) -> str:
    return os.path.join(output_dir, "checkpoints")


def save_checkpoint(output_dir, step, *, model, tokenizer, optimizer, scheduler, data_position, config, keep=2,
                    state_dict=None) -> str:
    """Write the state after `step` completed steps; returns the checkpoint directory.

    Call on the main process only; under FSDP pass the gathered full `state_dict`
    (`accelerator.get_state_dict(model)`, which every rank must call)."""
    root = checkpoint_root(output_dir)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step_{step:06d}")
    tmp = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    model.save_pretrained(os.path.join(tmp, "model"), state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(os.path.join(tmp, "model"))
    state = {
        "step": int(step),
        "data_position": data_position,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": capture_rng(),
        "config": (dataclasses.asdict(config) if dataclasses.is_dataclass(config) and not isinstance(config, type)
                   else dict(config)),
    }
    torch.save(state, os.path.join(tmp, "trainer_state.pt"))
    with open(os.path.join(tmp, MARKER), "w") as fh:
        fh.write(f"{step}\n")
    _fsync_tree(tmp)
    if os.path.exists(final):  # a stale checkpoint of the same step (e.g. from a resumed run)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _prune(root, keep)
    return final


def _complete_steps(root):
    out = []
    if not os.path.isdir(root):
        return out
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(root, name, MARKER)):
            out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out)


def _prune(root, keep):
    # leftovers of interrupted saves, then all but the newest `keep` complete checkpoints
    for name in os.listdir(root):
        if ".tmp-" in name:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    if keep and keep > 0:
        for _step, path in _complete_steps(root)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)


def latest_checkpoint(output_dir) -> str | None:
    """The newest complete checkpoint directory under output_dir, or None."""
    steps = _complete_steps(checkpoint_root(output_dir))
    return steps[-1][1] if steps else None


def resolve_resume(resume, output_dir) -> str | None:
    """--resume auto | PATH | none -> a checkpoint directory or None."""
    if resume in (None, "", "none"):
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    path = resume
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, MARKER)):
        inner = latest_checkpoint(path)  # a run directory was given
        path = inner or path
    if not os.path.isfile(os.path.join(path, MARKER)):
        raise ValueError(f"--resume must be 'auto', 'none' or a complete checkpoint directory, got {resume!r}")
    return path


def load_checkpoint(path, *, map_location="cpu") -> tuple[str, dict]:
    """Returns (model directory, trainer state dict). RNG states are restored by the caller
    (after everything that consumes randomness at start-up, e.g. model construction).

    Raises ValueError when trainer_state.pt holds anything but tensors and plain Python values
    (module docstring), or other keys than a trainer state's."""
    file = os.path.join(path, "trainer_state.pt")
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[-1]  # torch's last line names the refused global
        raise ValueError(f"--resume {path!r}: {file} holds an object other than tensors and plain Python values, "
                         f"refused because loading it could run code ({reason})") from err
    if not isinstance(state, dict) or set(state) != STATE_KEYS:
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"--resume {path!r}: {file} is not a trainer state (keys {sorted(STATE_KEYS)}), got {got}")
    return os.path.join(path, "model"), state
