"""The backend registry: one record per backend, read by dispatch (`resolve`, `implementation`), by the
availability report (`backends()`, public as `lpreg.backends()`) and by argument validation
(`names()`, which lpreg._validate checks `backend=` against).

This layer sits above the backends and below the op glue: the glue (lpreg._token_stats_ops,
lpreg._sparse_proxy_ops) imports it, it loads the backend modules by name, and no backend ever
imports it (tests/test_import_graph.py reads the module strings below as imports and checks both
rules).

A record (`Backend`) says which tensors the backend serves, which module serves each op, and how to
tell whether it can run here. An op the backend has no kernel for is served by `fallback_module`
(the PyTorch backend), and `backends()` says so in that backend's detail, the one place that message
lives. Today:

    op                   triton                              torch        cpu / cuda (lpreg._C)
    token_stats          lpreg.kernels.token_stats           PyTorch      lpreg._native
    sparse_proxy_stats   lpreg.kernels.sparse_proxy_stats    PyTorch      no kernel: PyTorch runs it
    build_proxy          no kernel: PyTorch runs it          PyTorch      no kernel: PyTorch runs it

("PyTorch" is lpreg._token_stats_torch_backend / lpreg._sparse_proxy_torch_backend.) Token-stats modules
expose `token_stats_forward` / `token_stats_backward`, sparse-proxy modules `sparse_proxy_forward` /
`sparse_proxy_backward` and `build_proxy_rows`, with the contracts written in their Triton kernel files.
For vocabulary-parallel logits the token-stats modules also expose `token_stats_shard_pass1` /
`token_stats_shard_pass2` (lpreg._vocab_parallel combines them across ranks), and both backwards take a
`vocab_offset`.

`backend="auto"` follows `AUTO`, written once: the first available backend in the device's preference
list. Imports are lazy (importlib), so `import lpreg` needs neither Triton nor a GPU nor the compiled
extension, and the backend is resolved inside the custom-op bodies, which torch.compile never traces.
"""

import importlib
import os
import warnings
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Set, Tuple

import torch

OPS = ("token_stats", "sparse_proxy_stats", "build_proxy")
# the PyTorch module of each op: every backend's fallback for an op it has no kernel for
_TORCH_MODULES = {
    "token_stats": "lpreg._token_stats_torch_backend",
    "sparse_proxy_stats": "lpreg._sparse_proxy_torch_backend",
    "build_proxy": "lpreg._sparse_proxy_torch_backend",
}


class BackendStatus(NamedTuple):
    """One backend of `lpreg.backends()`: whether it can run here, and what it is or why not."""

    available: bool
    detail: str


@dataclass(frozen=True)
class Backend:
    """One backend: its name (the `backend=` value), the tensor device types it serves (None: any),
    the module of each op it has a kernel for, and `status()`, whether it can run here and why not."""

    name: str
    devices: Optional[Tuple[str, ...]]
    modules: Mapping[str, str]
    status: Callable[[], BackendStatus]
    describe: str = ""
    # the reason a device it serves still needs more (e.g. Triton on CPU tensors needs the interpreter)
    device_check: Callable[[torch.device], str] = field(default=lambda device: "")

    def module(self, op: str) -> str:
        return self.modules.get(op, _TORCH_MODULES[op])

    def missing_ops(self) -> Tuple[str, ...]:
        return tuple(op for op in OPS if op not in self.modules)


# Availability is a fact of the installation: probed once (resolve() runs inside the custom ops,
# never under torch.compile's tracing).
_available: Dict[str, bool] = {}
_warned: Set[str] = set()


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


def _torch_status() -> BackendStatus:
    return BackendStatus(True, f"chunked PyTorch ops (torch {torch.__version__}), any device")


def _native_status(device_type: str) -> Callable[[], BackendStatus]:
    def status() -> BackendStatus:
        if native_available(device_type):
            return BackendStatus(True, f"lpreg._C compiled kernels for {device_type} tensors")
        return BackendStatus(False, native_unavailable_reason(device_type))
    return status


def _triton_status() -> BackendStatus:
    if not triton_available():
        return BackendStatus(False, "the triton package is not importable")
    version = getattr(importlib.import_module("triton"), "__version__", "?")
    where = "CUDA tensors" if torch.cuda.is_available() else "no CUDA device here"
    where += "; CPU tensors under TRITON_INTERPRET=1" if triton_interpreted() else ""
    return BackendStatus(True, f"triton {version}: {where}")


def _triton_device_check(device: torch.device) -> str:
    if device.type != "cuda" and not triton_interpreted():
        return (f"backend='triton' on a {device.type} tensor needs TRITON_INTERPRET=1 set before "
                "lpreg.kernels is imported")
    return ""


# The registry. A new backend is one record here and one module (docs/add_backend.md).
REGISTRY: Dict[str, Backend] = {b.name: b for b in (
    Backend("torch", None, dict(_TORCH_MODULES), _torch_status, "PyTorch, any device"),
    Backend("cpu", ("cpu",), {"token_stats": "lpreg._native"}, _native_status("cpu"),
            "the compiled extension lpreg._C, CPU tensors"),
    Backend("cuda", ("cuda",), {"token_stats": "lpreg._native"}, _native_status("cuda"),
            "the compiled extension lpreg._C, CUDA tensors"),
    Backend("triton", ("cuda", "cpu"), {"token_stats": "lpreg.kernels.token_stats",
                                        "sparse_proxy_stats": "lpreg.kernels.sparse_proxy_stats"},
            _triton_status, "Triton kernels (CPU tensors only under TRITON_INTERPRET=1)",
            device_check=_triton_device_check),
)}
# backend="auto": the first available backend of the tensor's device type (Triton first on CUDA, on design
# grounds until a GPU run measures both); any other device type runs "torch"
AUTO: Dict[str, Tuple[str, ...]] = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}


def names() -> Tuple[str, ...]:
    """Every valid `backend=` value: "auto", then the registered backends."""
    return ("auto", *REGISTRY)


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def auto_pick(device_type: str) -> Tuple[str, str]:
    """What backend="auto" runs on `device_type` tensors, and why the backends before it were passed
    over ("" when the first choice runs)."""
    skipped: List[str] = []
    for name in AUTO.get(device_type, ("torch",)):
        status = REGISTRY[name].status()
        if status.available:
            return name, "; ".join(skipped)
        skipped.append(f"{name}: {status.detail}")
    raise AssertionError("the torch backend is always available")


def resolve(backend: str, device: torch.device) -> str:
    """Turn backend="auto" into a concrete backend for `device`, and check explicit ones (ValueError
    naming the backend and the reason when it cannot serve this tensor here)."""
    if backend == "auto":
        name, skipped = auto_pick(device.type)
        if skipped:  # the device's first choice cannot run: say once what runs instead, and why
            _warn_once(device.type, f"lpreg: backend='auto' on {device.type} tensors runs backend={name!r} "
                                    f"({skipped})")
        return name
    record = REGISTRY[backend]
    if record.devices is not None and device.type not in record.devices:
        raise ValueError(f"backend={backend!r} needs {' or '.join(record.devices)} tensors, "
                         f"got a tensor on {device}")
    status = record.status()
    if not status.available:
        raise ValueError(f"backend={backend!r} cannot run here: {status.detail}")
    reason = record.device_check(device)
    if reason:
        raise ValueError(reason)
    return backend


def implementation(backend: str, op: str = "token_stats") -> ModuleType:
    """The module that serves `op` for a resolved backend name (its own kernel, or the PyTorch one)."""
    return importlib.import_module(REGISTRY[backend].module(op))


def backends() -> Dict[str, BackendStatus]:
    """What this installation can run, one entry per backend name, plus what backend="auto" picks.

        >>> import lpreg
        >>> lpreg.backends()["torch"].available
        True

    Keys: every registered backend ("torch" always available; "cpu" and "cuda", the compiled extension
    lpreg._C; "triton"), and "auto" (its `detail` names the backend "auto" resolves to on CPU tensors
    and, where a CUDA device is present, on CUDA tensors). A backend that cannot run says why in
    `detail` (for example the compiler error that stopped the extension's build and how to retry it);
    one that runs says which ops it has no kernel for, and that the PyTorch backend runs those.
    """
    out: Dict[str, BackendStatus] = {}
    for name, record in REGISTRY.items():
        status = record.status()
        missing = record.missing_ops()
        if status.available and missing:
            status = BackendStatus(True, f"{status.detail}; no kernel for {', '.join(missing)}: "
                                         "the PyTorch backend runs them")
        out[name] = status
    picks = [f"cpu tensors -> {auto_pick('cpu')[0]}"]
    if torch.cuda.is_available():
        picks.append(f"cuda tensors -> {auto_pick('cuda')[0]}")
    out["auto"] = BackendStatus(True, "; ".join(picks))
    return out
