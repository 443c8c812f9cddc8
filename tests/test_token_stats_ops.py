"""The torch.library ops: opcheck, torch.compile without graph breaks, the reference's own
gradients (gradcheck in float64), the shared row chunker, and the one row-statistics layout."""

import os
import re

import pytest
import torch

import lpreg
from lpreg import _contract as layout
from lpreg import _rows
from lpreg._token_stats_ops import token_stats_backward_op, token_stats_op
from tests.backends import ALL, runnable
from tests.spec_oracle import make_logits, spec_token_stats

BACKENDS = list(ALL)


def _op_args(backend, with_proxy, with_labels, requires_grad=True):
    x = make_logits(5, 37, seed=1).requires_grad_(requires_grad)
    labels = torch.tensor([0, 3, -100, 36, 9]) if with_labels else None
    proxy = make_logits(5, 37, seed=2) if with_proxy else None
    return (x, labels, proxy, 1 / 0.9, False, -3.9, -100, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_proxy", [False, True])
@pytest.mark.parametrize("with_labels", [False, True])
def test_opcheck_forward(backend, with_proxy, with_labels):
    # test_autograd_registration / test_aot_dispatch_dynamic / schema / faketensor
    torch.library.opcheck(token_stats_op, _op_args(backend, with_proxy, with_labels))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_backward(backend):
    x, labels, proxy, inv_t, fixed, log_th, ignore, _ = _op_args(backend, True, True, requires_grad=False)
    stats = token_stats_op(x, labels, proxy, inv_t, fixed, log_th, ignore, backend)[4]
    g = torch.randn(5)
    args = (x, labels, proxy, stats, g, None, g * 2, inv_t, ignore, backend)
    torch.library.opcheck(token_stats_backward_op, args)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_torch_compile_fullgraph_traces_forward_and_backward(backend):
    def loss_fn(logits, labels, adv):
        stats = lpreg.lpreg_token_stats(logits, labels, temperature=0.8, backend=backend)
        return (-(stats.logp * adv) + 0.5 * stats.kl - 0.01 * stats.entropy).mean()

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    x = make_logits(6, 50, seed=3).reshape(2, 3, 50)
    labels = x.argmax(-1)  # finite logits: a -inf label would make the loss non-finite
    adv = torch.linspace(-1.0, 1.0, 6).reshape(2, 3)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    la, lb = compiled(xa, labels, adv), loss_fn(xb, labels, adv)
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(xa.grad, xb.grad)


def test_torch_compile_inductor():
    # Inductor generates and builds C++ for the surrounding ops; the lpreg ops stay opaque.
    def loss_fn(logits, labels):
        stats = lpreg.lpreg_token_stats(logits, labels, backend="torch")
        return (stats.kl - stats.logp).sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True)
    x = make_logits(4, 30, seed=6).requires_grad_()
    labels = torch.tensor([1, 2, 3, 4])
    compiled(x, labels).backward()
    ref = spec_token_stats(x, labels)
    torch.testing.assert_close(compiled(x.detach(), labels).double(), (ref["kl"] - ref["logp"]).sum(),
                               rtol=1e-5, atol=1e-5)
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("mode", ["min_p", "fixed"])
@pytest.mark.parametrize("with_proxy", [False, True])
def test_reference_gradcheck_float64(mode, with_proxy):
    x = make_logits(4, 9, seed=10).double().requires_grad_()
    labels = torch.tensor([0, 4, -100, 8])
    proxy = make_logits(4, 9, seed=11).double() if with_proxy else None
    w = torch.randn(3, 4, dtype=torch.float64)

    def f(z):
        s = lpreg.reference.lpreg_token_stats(z, labels, temperature=0.7, mode=mode, threshold=0.05,
                                              proxy_logits=proxy)
        # On-policy, the proxy is a stop-gradient copy of z: finite differences would move it
        # too, so kl is checked only against a separate proxy.
        kl_term = w[1] * s.kl if with_proxy else 0.0
        return (w[0] * s.logp + kl_term + w[2] * s.entropy).sum()

    finite = torch.isfinite(x)
    x_fin = x.detach().clone()

    def g(free):
        z = x_fin.clone()
        z[finite] = free
        return f(z)

    assert torch.autograd.gradcheck(g, (x_fin[finite].clone().requires_grad_(),))


def test_reference_chunks_rows(monkeypatch):
    # Small chunk so that several chunks (and the checkpointed backward) are exercised.
    monkeypatch.setattr(_rows, "CHUNK_ELEMENTS", 64)
    x = make_logits(10, 30, seed=12).requires_grad_()
    labels = torch.randint(0, 30, (10,))
    s = lpreg.reference.lpreg_token_stats(x, labels)
    ref = spec_token_stats(x, labels)
    torch.testing.assert_close(s.kl.double(), ref["kl"], rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(s.kl.sum() + s.logp.sum(), x)
    want = -(ref["p"] - ref["q"]) * 0 + (ref["p"] - ref["q"]) + (ref["onehot"] - ref["p"])
    torch.testing.assert_close(grad.double(), want, rtol=1e-5, atol=1e-6)


def test_torch_backend_chunks_rows(monkeypatch):
    # The torch backend walks rows with the same chunker: results are row-wise, so a chunk of
    # 2 rows must give exactly what one chunk of all rows gives.
    x = make_logits(10, 30, seed=13)
    labels = torch.randint(0, 30, (10,))
    labels[4] = -100

    def run():
        xx = x.clone().requires_grad_()
        s = lpreg.lpreg_token_stats(xx, labels, backend="torch")
        (grad,) = torch.autograd.grad((s.kl + s.logp + s.entropy).sum(), xx)
        return (*s, grad)

    whole = run()
    monkeypatch.setattr(_rows, "CHUNK_ELEMENTS", 64)  # 64 // 30 = 2 rows per chunk
    assert list(_rows.row_chunks(10, 30))[:2] == [(0, 2), (2, 4)]
    for a, b in zip(whole, run()):
        assert torch.equal(a, b)


def test_row_stats_layout_is_one_definition():
    # Python / Triton read lpreg/_contract.py; C++ and CUDA name the same slots in
    # csrc/row_stats.h. Both must agree.
    header = os.path.join(os.path.dirname(__file__), "..", "csrc", "row_stats.h")
    with open(header) as f:
        consts = dict(re.findall(r"constexpr (?:int|float) (k\w+) = (-?[\d.]+)f?;", f.read()))
    want = {"kStatLse": layout.LSE, "kStatEntropy": layout.ENTROPY, "kStatLseKept": layout.LSE_KEPT,
            "kStatCutoff": layout.CUTOFF, "kStatArgmax": layout.ARGMAX,
            "kRowStatsWidth": layout.TOKEN_STATS_WIDTH, "kNoArgmax": layout.NO_ARGMAX}
    assert {k: float(v) for k, v in consts.items()} == {k: float(v) for k, v in want.items()}
    assert layout.TOKEN_STATS_SLOTS[layout.LSE] == "lse" and layout.TOKEN_STATS_SLOTS[layout.ARGMAX] == "argmax_y"
    assert layout.SPARSE_PROXY_SLOTS == layout.TOKEN_STATS_SLOTS[:layout.SPARSE_PROXY_WIDTH]
    for backend in runnable(*BACKENDS):  # every backend's forward returns rows of that width
        out = token_stats_op(*_op_args(backend, False, True, requires_grad=False))
        assert out[4].shape == (5, layout.TOKEN_STATS_WIDTH)
        assert out[4][2].tolist() == [0.0, 0.0, 0.0, 0.0, float(layout.NO_ARGMAX)]  # the ignored row
