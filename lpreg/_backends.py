"""Backend registry: which implementation serves `backend=` for an op and a tensor's device.

Every op resolves `backend=` the same way (`resolve`: "auto" picks per device, an explicit
backend that cannot serve the tensor raises ValueError), then looks up the module that
serves the resolved name (`implementation`):

    op                   triton                              torch / cpu / cuda
    token_stats          lpreg.kernels.token_stats           lpreg._token_stats_torch_backend / lpreg._native (x2)
    sparse_proxy_stats   lpreg.kernels.sparse_proxy_stats    lpreg._sparse_proxy_torch_backend (x3)

Token-stats modules expose `token_stats_forward(...)` / `token_stats_backward(...)`, sparse
proxy modules `sparse_proxy_forward(...)` / `sparse_proxy_backward(...)`, with the contracts
documented in their Triton kernel files. The compiled extension has no sparse-proxy kernel:
"cpu" and "cuda" are checked exactly as for token stats and then served by the torch module.
Imports are lazy, so that `import lpreg` needs neither Triton nor a GPU nor the compiled
extension.
"""

import importlib
import os
import warnings

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
}
_warned = set()


def implementation(backend, op="token_stats"):
    """The module that serves `op` for a resolved backend name."""
    return importlib.import_module(_MODULES[op][backend])


# Availability is a fact of the installation: probed once (resolve() runs inside the custom
# ops, never under torch.compile's tracing).
_available = {}


def _probe(key, check):
    if key not in _available:
        try:
            _available[key] = bool(check())
        except Exception:
            _available[key] = False
    return _available[key]


def triton_available():
    return _probe("triton", lambda: importlib.import_module("triton") is not None)


def triton_interpreted():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def native_available(device_type):
    return _probe(device_type, lambda: importlib.import_module("lpreg._native").available(device_type))


def _warn_once(key, message):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def resolve(backend, device):
    """Turn backend="auto" into a concrete backend for `device`, and check explicit ones."""
    kind = device.type
    if backend == "auto":
        if kind == "cuda":
            # Triton is the measured default on CUDA; the CUDA extension is the fallback.
            if triton_available():
                return "triton"
            if native_available("cuda"):
                return "cuda"
            _warn_once("cuda", "lpreg: neither Triton nor lpreg._C (CUDA) is available; using backend='torch'")
            return "torch"
        if kind == "cpu":
            if native_available("cpu"):
                return "cpu"
            _warn_once("cpu", "lpreg: the compiled extension lpreg._C is not available; using backend='torch'")
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
            raise ValueError(f"backend={backend!r} needs the compiled extension lpreg._C built with {backend} support")
    return backend
