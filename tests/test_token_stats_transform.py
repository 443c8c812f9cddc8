"""The logit transform (logit_scale, logit_softcap) in every op and backend, against the float64 spec.

z = c tanh(s x / c) (soft-cap c) or z = s x, applied to the raw logits (and a dense proxy) before the
temperature, forward and backward (docs/spec.md "The logit transform"). Cases: large |x| where tanh
saturates (its derivative is 0 there), -inf entries (a soft-cap maps them to -c, a finite logit), NaN
(a NaN logit gives NaN statistics and a NaN gradient in its row alone), and the identity, which keeps
the results of the op without the transform bit for bit.
"""

import math

import pytest
import torch

import lpreg
from tests.backends import ALL, runnable
from tests.spec_oracle import OUTPUTS, assert_backend_matches_spec, make_logits, spec_grad, spec_token_stats

BACKENDS = list(ALL)
# (logit_scale, logit_softcap): a multiplier alone (Cohere / Granite-like), a soft-cap alone (Gemma), both
TRANSFORMS = [(0.0625, None), (2.5, None), (1.0, 30.0), (1.0, 3.0), (1.7, 5.0)]


def _upstream(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * 2 + 0.5 for _ in range(3)]


def _logits(rows, V, seed, spread=8.0):
    """make_logits' rows (peaked, flat, -inf entries), scaled up so that some |s x / c| saturate tanh."""
    x = make_logits(rows, V, seed=seed) * spread
    x[0, 1] = 1e6  # tanh(1e6 s / c) = 1 exactly: the soft-cap's derivative is 0 there
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("logit_scale,logit_softcap", TRANSFORMS)
@pytest.mark.parametrize("mode,temperature,proxy", [("min_p", 0.7, False), ("fixed", 1.3, False),
                                                     ("min_p", 1.0, True)])
def test_fp32_matches_spec(backend, logit_scale, logit_softcap, mode, temperature, proxy):
    rows, V = 6, 300
    logits = _logits(rows, V, seed=3).reshape(2, 3, V)
    labels = torch.randint(0, V, (2, 3), generator=torch.Generator().manual_seed(4))
    labels[0, 2] = -100
    proxy_logits = _logits(rows, V, seed=9).reshape(2, 3, V) if proxy else None
    assert_backend_matches_spec(backend, logits, labels, _upstream(labels.shape, 5), temperature=temperature,
                                mode=mode, threshold=0.02 if mode == "min_p" else 0.01, proxy_logits=proxy_logits,
                                logit_scale=logit_scale, logit_softcap=logit_softcap)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_soft_cap_within_twice_eager_error(backend, dtype):
    V = 1000
    logits = _logits(5, V, seed=11, spread=4.0).to(dtype).reshape(1, 5, V)
    labels = torch.randint(0, V, (1, 5), generator=torch.Generator().manual_seed(12))
    assert_backend_matches_spec(backend, logits, labels, _upstream(labels.shape, 13), temperature=0.9,
                                mode="min_p", threshold=0.02, logit_scale=1.0, logit_softcap=30.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_identity_is_bitwise_the_op_without_the_transform(backend):
    x = _logits(4, 200, seed=21)
    labels = torch.tensor([3, -100, 5, 6])
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    plain = lpreg.lpreg_token_stats(a, labels, temperature=0.8, backend=backend)
    ident = lpreg.lpreg_token_stats(b, labels, temperature=0.8, backend=backend, logit_scale=1.0, logit_softcap=None)
    for p, q in zip(plain, ident):
        assert torch.equal(p, q)
    (ga,) = torch.autograd.grad(plain.logp.sum() + plain.kl.sum() + plain.entropy.sum(), a)
    (gb,) = torch.autograd.grad(ident.logp.sum() + ident.kl.sum() + ident.entropy.sum(), b)
    assert torch.equal(ga, gb)


@pytest.mark.parametrize("backend", BACKENDS)
def test_soft_cap_turns_inf_rows_finite_and_keeps_nan_rows_nan(backend):
    """With a soft-cap, -inf maps to -c and +inf to +c (what the model itself emits): an all -inf row is
    the uniform distribution, a +inf row is finite. A NaN stays NaN: NaN statistics, NaN gradient, in its
    row alone."""
    V, c = 40, 4.0
    x = make_logits(4, V, seed=5)
    x[1, 17] = float("nan")
    x[2] = -math.inf
    x[3, 7] = math.inf
    labels = torch.tensor([3, 4, 5, 7])
    xg = x.clone().requires_grad_()
    out = lpreg.lpreg_token_stats(xg, labels, backend=backend, logit_softcap=c)
    ref = spec_token_stats(x, labels, logit_softcap=c)
    for name in OUTPUTS:
        v = getattr(out, name)
        assert torch.isnan(v[1]), name
        torch.testing.assert_close(v[[0, 2, 3]].double(), ref[name][[0, 2, 3]], rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(out.entropy[2].double(), torch.tensor(math.log(V), dtype=torch.float64))
    (grad,) = torch.autograd.grad(out.logp[[0, 2, 3]].sum() + out.kl[1] + out.entropy[2], xg)
    assert torch.isnan(grad[1]).all() and torch.isfinite(grad[[0, 2, 3]]).all()
    assert (grad[2] == 0).all() and grad[3, 7] == 0  # dz/dx = 0 at +-inf: tanh is flat there


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("logit_scale,logit_softcap", [(0.25, None), (1.5, 6.0)])
def test_lpreg_kl_with_transform(backend, logit_scale, logit_softcap):
    x = _logits(5, 120, seed=31)
    xg = x.clone().requires_grad_()
    kl = lpreg.lpreg_kl(xg, backend=backend, mode="fixed", threshold=0.01, logit_scale=logit_scale,
                        logit_softcap=logit_softcap)
    ref = spec_token_stats(x, None, mode="fixed", threshold=0.01, logit_scale=logit_scale,
                           logit_softcap=logit_softcap)
    torch.testing.assert_close(kl.double(), ref["kl"], rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(kl.sum(), xg)
    want = spec_grad(ref, g_kl=torch.ones(5))
    torch.testing.assert_close(grad.double(), want, rtol=1e-4, atol=1e-6)


def _sparse_reference(x, labels, proxy, temperature, logit_scale, logit_softcap):
    """sparse_proxy_stats on transformed logits, computed by the same op on z = transform(x) with autograd
    through the transform (float64 logits: the op reads them in fp32)."""
    xd = x.double().requires_grad_()
    z = lpreg.LogitTransform(logit_scale, logit_softcap).apply(xd)
    out = lpreg.sparse_proxy_stats(z, labels, proxy, temperature=temperature, backend="torch")
    return xd, out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("logit_scale,logit_softcap", [(0.5, None), (1.0, 5.0)])
def test_build_proxy_and_sparse_proxy_stats_with_transform(backend, logit_scale, logit_softcap):
    V = 150
    x = _logits(6, V, seed=41)
    labels = torch.randint(0, V, (6,), generator=torch.Generator().manual_seed(42))
    labels[4] = -100
    kw = dict(temperature=0.8, logit_scale=logit_scale, logit_softcap=logit_softcap)
    proxy = lpreg.build_proxy(x, labels, k=16, backend=backend, **kw)
    z = lpreg.LogitTransform(logit_scale, logit_softcap).apply(x.double()).float()
    want_proxy = lpreg.build_proxy(z, labels, k=16, temperature=0.8, backend="torch")
    assert torch.equal(proxy.indices, want_proxy.indices)
    for got, want in zip(proxy[1:], want_proxy[1:]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)
    xg = x.clone().requires_grad_()
    out = lpreg.sparse_proxy_stats(xg, labels, proxy, backend=backend, **kw)
    xd, ref = _sparse_reference(x, labels, proxy, 0.8, logit_scale, logit_softcap)
    for name in OUTPUTS:
        torch.testing.assert_close(getattr(out, name).double(), getattr(ref, name).double(), rtol=1e-5, atol=1e-5,
                                   msg=name)
    g = _upstream((6,), 43)
    (grad,) = torch.autograd.grad((out.logp * g[0] + out.kl * g[1] + out.entropy * g[2]).sum(), xg)
    (want,) = torch.autograd.grad((ref.logp * g[0] + ref.kl * g[1] + ref.entropy * g[2]).sum(), xd)
    torch.testing.assert_close(grad.double(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("op", ["token_stats", "kl", "build_proxy", "sparse_proxy_stats"])
@pytest.mark.parametrize("name,value", [("logit_scale", 0.0), ("logit_scale", -1.0), ("logit_scale", math.nan),
                                        ("logit_scale", math.inf), ("logit_softcap", 0.0),
                                        ("logit_softcap", -3.0), ("logit_softcap", math.nan),
                                        ("logit_softcap", math.inf)])
def test_bad_transform_values_raise_naming_argument_and_value(op, name, value):
    x = torch.randn(2, 9)
    labels = torch.tensor([1, 2])
    calls = {
        "token_stats": lambda **kw: lpreg.lpreg_token_stats(x, labels, backend="torch", **kw),
        "kl": lambda **kw: lpreg.lpreg_kl(x, backend="torch", **kw),
        "build_proxy": lambda **kw: lpreg.build_proxy(x, labels, k=3, backend="torch", **kw),
        "sparse_proxy_stats": lambda **kw: lpreg.sparse_proxy_stats(
            x, labels, lpreg.build_proxy(x, labels, k=3), backend="torch", **kw),
    }
    with pytest.raises(ValueError, match=name) as err:
        calls[op](**{name: value})
    assert repr(value) in str(err.value)


@pytest.mark.parametrize("mode,threshold,proxy,cap", [("min_p", 0.02, False, 30.0), ("fixed", 0.01, False, 30.0),
                                                       ("fixed", 0.5, True, 30.0), ("min_p", 0.3, True, 0.5)])
def test_backends_agree_on_a_gemma_style_head(mode, threshold, proxy, cap):
    """Soft-capped rows spanning many blocks (the C++ pass 2 soft-caps only the vectors that can hold a
    candidate), peaked and flat, "fixed" with K = {argmax} alone (threshold 0.5), on the backends that
    take long rows here, against the float64 spec."""
    V = 32000
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, V, generator=gen) * 12
    x[1] *= 0.01  # flat: every token a candidate
    x[2, 17] = 40.0  # peaked
    x[3, ::3] = -math.inf
    p = (x + torch.randn(4, V, generator=gen)) if proxy else None
    labels = torch.tensor([5, 60, 17, 31999])
    kw = dict(mode=mode, threshold=threshold, logit_softcap=cap, temperature=0.8)
    ref = spec_token_stats(x, labels, proxy_logits=p, **kw)
    g = _upstream((4,), 8)
    for backend in runnable("torch", "cpu"):
        xg = x.clone().requires_grad_()
        out = lpreg.lpreg_token_stats(xg, labels, proxy_logits=p, backend=backend, **kw)
        for name in OUTPUTS:
            torch.testing.assert_close(getattr(out, name).double(), ref[name], rtol=1e-5, atol=1e-5, msg=name)
        (grad,) = torch.autograd.grad((out.logp * g[0] + out.kl * g[1] + out.entropy * g[2]).sum(), xg)
        want = spec_grad(ref, *g, temperature=0.8)
        assert (grad.double() - want).abs().max().item() <= 1e-6 + 1e-5 * want.abs().max().item()


@pytest.mark.parametrize("logit_scale,logit_softcap", [(0.5, None), (1.2, 4.0)])
def test_reference_module_takes_the_transform(logit_scale, logit_softcap):
    """lpreg.reference (the readable oracle) with the transform equals the float64 spec, values and grads."""
    x = _logits(4, 90, seed=51)
    labels = torch.tensor([3, 4, -100, 6])
    xg = x.double().requires_grad_()
    st = lpreg.reference.lpreg_token_stats(xg, labels, temperature=0.9, logit_scale=logit_scale,
                                           logit_softcap=logit_softcap)
    ref = spec_token_stats(x, labels, temperature=0.9, logit_scale=logit_scale, logit_softcap=logit_softcap)
    for name in OUTPUTS:
        torch.testing.assert_close(getattr(st, name), ref[name], rtol=1e-10, atol=1e-10, msg=name)
    g = _upstream((4,), 52)
    (grad,) = torch.autograd.grad((st.logp * g[0] + st.kl * g[1] + st.entropy * g[2]).sum(), xg)
    torch.testing.assert_close(grad, spec_grad(ref, *g, temperature=0.9), rtol=1e-9, atol=1e-10)
    kl = lpreg.reference.lpreg_kl(x.double(), temperature=0.9, logit_scale=logit_scale, logit_softcap=logit_softcap)
    torch.testing.assert_close(kl, spec_token_stats(x, None, temperature=0.9, logit_scale=logit_scale,
                                                    logit_softcap=logit_softcap)["kl"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_with_the_transform(backend):
    """The ops' schemas, fake kernels and autograd registrations take the transform's two arguments."""
    from lpreg._sparse_proxy_ops import build_proxy_op, sparse_proxy_stats_op
    from lpreg._token_stats_ops import token_stats_op

    x = (torch.randn(3, 20, generator=torch.Generator().manual_seed(3)) * 5).requires_grad_()
    lab = torch.tensor([1, -100, 5])
    torch.library.opcheck(token_stats_op, (x, lab, None, 1 / 0.9, False, math.log(0.02), -100, backend, 1.5, 4.0))
    torch.library.opcheck(token_stats_op, (x, lab, None, 1 / 0.9, True, math.log(0.02), -100, backend, 0.5, None))
    idx, logq, _, _ = build_proxy_op(x.detach(), lab, 1.0, False, math.log(0.02), 4, -100, backend, 1.5, 4.0)
    torch.library.opcheck(sparse_proxy_stats_op, (x, lab, idx.long(), logq, None, 1.0, -100, backend, 1.5, 4.0))
    torch.library.opcheck(build_proxy_op, (x.detach(), lab, 1.0, False, math.log(0.02), 4, -100, backend, 1.5, 4.0))
