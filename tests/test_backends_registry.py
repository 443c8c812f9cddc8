"""The backend registry is data: one record per backend, read by dispatch, by `lpreg.backends()` and by
argument validation alike, with the "auto" policy written once (lpreg/_backends.py)."""

import warnings

import pytest
import torch

import lpreg
from lpreg import _backends
from lpreg._backends import AUTO, REGISTRY, Backend, BackendStatus


def test_validation_backends_and_the_report_read_the_same_names():
    assert _backends.names() == ("auto", *REGISTRY)
    assert set(lpreg.backends()) == {"auto", *REGISTRY}
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'torch', 'cpu', 'cuda', 'triton'\), "
                                         r"got 'tpu'"):
        lpreg.lpreg_token_stats(torch.randn(2, 5), torch.tensor([0, 1]), backend="tpu")


def test_every_op_has_a_module_for_every_backend_and_auto_lists_only_registered_names():
    for record in REGISTRY.values():
        for op in _backends.OPS:
            assert record.module(op).startswith("lpreg.")
    assert all(name in REGISTRY for names in AUTO.values() for name in names)
    assert all(names[-1] == "torch" for names in AUTO.values())  # "auto" always finds one


def test_a_backend_without_a_kernel_for_an_op_says_what_runs_instead():
    assert REGISTRY["cpu"].missing_ops() == ("sparse_proxy_stats", "build_proxy")
    assert REGISTRY["cpu"].module("sparse_proxy_stats") == "lpreg._sparse_proxy_torch_backend"
    detail = lpreg.backends()["torch"].detail
    assert "no kernel" not in detail
    if lpreg.backends()["cpu"].available:
        assert ("no kernel for sparse_proxy_stats, build_proxy: the PyTorch backend runs them"
                in lpreg.backends()["cpu"].detail)


def test_auto_takes_the_first_available_backend_and_says_once_why_it_passed_one_over(monkeypatch):
    down = Backend("cpu", ("cpu",), {"token_stats": "lpreg._native"},
                   lambda: BackendStatus(False, "the build failed (test)"))
    monkeypatch.setitem(REGISTRY, "cpu", down)
    monkeypatch.setattr(_backends, "_warned", set())
    with pytest.warns(RuntimeWarning, match=r"backend='auto' on cpu tensors runs backend='torch' "
                                            r"\(cpu: the build failed \(test\)\)"):
        assert _backends.resolve("auto", torch.device("cpu")) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the second call is silent
        assert _backends.resolve("auto", torch.device("cpu")) == "torch"
    assert lpreg.backends()["auto"].detail.startswith("cpu tensors -> torch")
    with pytest.raises(ValueError, match=r"backend='cpu' cannot run here: the build failed \(test\)"):
        _backends.resolve("cpu", torch.device("cpu"))


def test_an_explicit_backend_on_the_wrong_device_names_both():
    with pytest.raises(ValueError, match="backend='cuda' needs cuda tensors, got a tensor on cpu"):
        _backends.resolve("cuda", torch.device("cpu"))


def test_a_new_backend_is_one_record(monkeypatch):
    """Registered, it is validated, reported, resolved and dispatched without another edit."""
    record = Backend("mine", ("cpu",), {"token_stats": "lpreg._token_stats_torch_backend"},
                     lambda: BackendStatus(True, "a test backend"))
    monkeypatch.setitem(REGISTRY, "mine", record)
    assert lpreg.backends()["mine"] == BackendStatus(
        True, "a test backend; no kernel for sparse_proxy_stats, build_proxy: the PyTorch backend runs them")
    assert _backends.resolve("mine", torch.device("cpu")) == "mine"
    assert _backends.implementation("mine").__name__ == "lpreg._token_stats_torch_backend"
    logits, labels = torch.randn(3, 7, dtype=torch.float64).float(), torch.tensor([0, 3, 6])
    got = lpreg.lpreg_token_stats(logits, labels, backend="mine")
    want = lpreg.lpreg_token_stats(logits, labels, backend="torch")
    assert torch.equal(got.logp, want.logp) and torch.equal(got.kl, want.kl)
