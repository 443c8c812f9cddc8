"""The backend table: which module serves which op for each backend name, and how `backend=` resolves.

This layer sits above the backends and below the op glue: the glue (lpreg._token_stats_ops,
lpreg._sparse_proxy_ops) imports it, it loads the backend modules by name, and no backend ever
imports it (tests/test_import_graph.py reads the `importlib.import_module` strings below as imports
and checks both rules).

Every op resolves `backend=` the same way (`resolve`: "auto" picks per device; an explicit backend
that cannot serve the tensor raises ValueError), then looks up the module that serves the resolved
name (`implementation`):

    op                   triton                              torch / cpu / cuda
    token_stats          lpreg.kernels.token_stats           lpreg._token_stats_torch_backend / lpreg._native (x2)
    sparse_proxy_stats   lpreg.kernels.sparse_proxy_stats    lpreg._sparse_proxy_torch_backend (x3)
    build_proxy          lpreg._sparse_proxy_torch_backend (every backend: a no-grad top-k, no kernel)

Token-stats modules expose `token_stats_forward` / `token_stats_backward`, sparse-proxy modules
`sparse_proxy_forward` / `sparse_proxy_backward` and `build_proxy_rows`, with the contracts written
in their Triton kernel files. For vocabulary-parallel logits (a shard of columns [offset, offset + V)
on each rank) the token-stats modules also expose the two halves of the forward's row pass,
`token_stats_shard_pass1` / `token_stats_shard_pass2` (lpreg._vocab_parallel combines them across
ranks, for the sparse proxy and build_proxy too), and both backwards take a `vocab_offset`: labels,
the argmax slot and proxy indices stay global vocabulary indices. The compiled extension has no
sparse-proxy kernel: "cpu" and "cuda" are checked exactly as for token stats and then served by the
PyTorch module. Imports are lazy (importlib), so `import lpreg` needs neither Triton nor a GPU nor
the compiled extension, and the backend is resolved inside the custom-op bodies, which
torch.compile never traces.

`backends()` (public, `lpreg.backends()`) reports what this installation can run, and why not.
"""

import importlib
import os
import warnings
from types import ModuleType
from typing import Callable, Dict, NamedTuple, Set

import torch

_MODULES = {
    "token_stats": {
        "triton": "lpreg.kernels.token_stats",
        "torch": "lpreg._token_stats_torch_backend",
        "cpu": "lpreg._native",
        "cuda": "lpreg._native",
    },
    "sparse_proxy_stats": {
        "triton": "lpreg.kernels.sparse_proxy_stats",
        "torch": "lpreg._sparse_proxy_torch_backend",
        "cpu": "lpreg._sparse_proxy_torch_backend",
        "cuda": "lpreg._sparse_proxy_torch_backend",
    },
    "build_proxy": {name: "lpreg._sparse_proxy_torch_backend" for name in ("triton", "torch", "cpu", "cuda")},
}
_warned: Set[str] = set()


def implementation(backend: str, op: str = "token_stats") -> ModuleType:
    """The module that serves `op` for a resolved backend name."""
    return importlib.import_module(_MODULES[op][backend])


# Availability is a fact of the installation: probed once (resolve() runs inside the custom ops,
# never under torch.compile's tracing).
_available: Dict[str, bool] = {}


def _probe(key: str, check: Callable[[], object]) -> bool:
    if key not in _available:
        try:
            _available[key] = bool(check())
        except Exception:
            _available[key] = False
    return _available[key]


def triton_available() -> bool:
    return _probe("triton", lambda: importlib.import_module("triton") is not None)


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def native_available(device_type: str) -> bool:
    return _probe(device_type, lambda: importlib.import_module("lpreg._native").available(device_type))


def native_unavailable_reason(device_type: str = "cpu") -> str:
    """Why backend=`device_type` (the compiled extension) cannot run here; "" when it can."""
    if native_available(device_type):
        return ""
    return importlib.import_module("lpreg._native").unavailable_reason(device_type)


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def resolve(backend: str, device: torch.device) -> str:
    """Turn backend="auto" into a concrete backend for `device`, and check explicit ones."""
    kind = device.type
    if backend == "auto":
        if kind == "cuda":
            # Triton first on CUDA (design grounds until a GPU run measures both); CUDA C++ the fallback
            if triton_available():
                return "triton"
            if native_available("cuda"):
                return "cuda"
            _warn_once("cuda", "lpreg: neither Triton nor lpreg._C (CUDA) is available; using backend='torch'")
            return "torch"
        if kind == "cpu":
            if native_available("cpu"):
                return "cpu"
            _warn_once("cpu", "lpreg: the compiled extension lpreg._C is not available "
                              f"({native_unavailable_reason('cpu')}); using backend='torch'")
            return "torch"
        return "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package, which is not importable")
        if kind != "cuda" and not triton_interpreted():
            raise ValueError(
                f"backend='triton' on a {kind} tensor needs TRITON_INTERPRET=1 set before lpreg.kernels is imported"
            )
    elif backend in ("cpu", "cuda"):
        if kind != backend:
            raise ValueError(f"backend={backend!r} needs {backend} tensors, got a tensor on {device}")
        if not native_available(backend):
            raise ValueError(f"backend={backend!r} needs the compiled extension lpreg._C built with {backend} "
                             f"support: {native_unavailable_reason(backend)}")
    return backend


class BackendStatus(NamedTuple):
    """One backend of `lpreg.backends()`: whether it can run here, and what it is or why not."""

    available: bool
    detail: str


def backends() -> Dict[str, BackendStatus]:
    """What this installation can run, one entry per backend name, plus what backend="auto" picks.

        >>> import lpreg
        >>> lpreg.backends()["torch"].available
        True

    Keys: "torch" (always), "cpu" and "cuda" (the compiled extension lpreg._C), "triton", and
    "auto" (its `detail` names the backend "auto" resolves to on CPU tensors and, where a CUDA
    device is present, on CUDA tensors). A backend that cannot run says why in `detail`, for
    example the compiler error that stopped the extension's build and how to retry it.
    """
    out = {"torch": BackendStatus(True, f"chunked PyTorch ops (torch {torch.__version__}), any device")}
    for device in ("cpu", "cuda"):
        if native_available(device):
            out[device] = BackendStatus(True, f"lpreg._C compiled kernels for {device} tensors")
        else:
            out[device] = BackendStatus(False, native_unavailable_reason(device))
    if triton_available():
        version = getattr(importlib.import_module("triton"), "__version__", "?")
        where = ("CUDA tensors" if torch.cuda.is_available() else "no CUDA device here")
        where += "; CPU tensors under TRITON_INTERPRET=1" if triton_interpreted() else ""
        out["triton"] = BackendStatus(True, f"triton {version}: {where}")
    else:
        out["triton"] = BackendStatus(False, "the triton package is not importable")
    picks = ["cpu tensors -> " + ("cpu" if native_available("cpu") else "torch")]
    if torch.cuda.is_available():
        cuda_pick = "triton" if triton_available() else ("cuda" if native_available("cuda") else "torch")
        picks.append(f"cuda tensors -> {cuda_pick}")
    out["auto"] = BackendStatus(True, "; ".join(picks))
    return out
