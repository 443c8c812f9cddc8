"""`lpreg.fused_linear_build_proxy`: the rollout proxy record from hidden states and the LM head,
equal to `lpreg.build_proxy` on the materialised logits; and the fused paths' precision rule under
autocast (their chunk products ignore an enclosing autocast region: the same bits inside and out)."""

import math

import pytest
import torch

import lpreg
from tests.test_fused_linear import make_linear


def same_record(got, want, exact):
    """exact: bitwise; else the same captured (index, log q) pairs per row (their order is free) and
    values within fp32 rounding of the two products."""
    assert got.indices.dtype == torch.int32 and got.indices.shape == want.indices.shape
    assert (got.label_logq is None) == (want.label_logq is None)
    fields = ("indices", "logq", "coverage") + (() if want.label_logq is None else ("label_logq",))
    if exact:
        for name in fields:
            assert torch.equal(getattr(got, name).nan_to_num(7.0), getattr(want, name).nan_to_num(7.0)), name
        return
    g, w = got.flatten(), want.flatten()
    captured = w.logq > -math.inf
    assert torch.equal(g.logq > -math.inf, captured)
    for row in range(captured.shape[0]):
        a = sorted(zip(w.indices[row][captured[row]].tolist(), w.logq[row][captured[row]].tolist()))
        b = sorted(zip(g.indices[row][captured[row]].tolist(), g.logq[row][captured[row]].tolist()))
        assert [i for i, _ in a] == [i for i, _ in b], row
        torch.testing.assert_close(torch.tensor([v for _, v in b]), torch.tensor([v for _, v in a]),
                                   rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.coverage, want.coverage, rtol=1e-5, atol=1e-6)
    if want.label_logq is not None:
        torch.testing.assert_close(got.label_logq, want.label_logq, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode,threshold", [("min_p", 0.02), ("fixed", 0.05)])
@pytest.mark.parametrize("with_labels", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_equals_build_proxy_on_materialised_logits(mode, threshold, with_labels, with_bias):
    hidden, weight, bias, labels, *_ = make_linear(seed=2, with_bias=with_bias)
    labels = labels.masked_fill(torch.arange(labels.numel()).reshape(labels.shape) % 7 == 3, -100)
    logits = hidden @ weight.T + (0 if bias is None else bias)
    kw = dict(temperature=0.8, mode=mode, threshold=threshold, k=5)
    lab = labels if with_labels else None
    want = lpreg.build_proxy(logits, lab, **kw)
    assert (want.coverage < 1).any() and (want.coverage == 1).any()  # rows with more, and fewer, than k kept
    # one chunk: the same product as the materialised logits, so the same bits
    same_record(lpreg.fused_linear_build_proxy(hidden, weight, lab, bias=bias, **kw), want, exact=True)
    # chunks of 5 rows (N = 36): the same record up to the rounding of the chunked products
    same_record(lpreg.fused_linear_build_proxy(hidden, weight, lab, bias=bias, chunk_size=5, **kw), want, exact=False)


def test_bf16_head_is_recorded_from_fp32_logits_of_the_bf16_values():
    hidden, weight, bias, labels, *_ = make_linear(seed=3, dtype=torch.bfloat16)
    want = lpreg.build_proxy(hidden.float() @ weight.float().T + bias.float(), labels, k=4)
    same_record(lpreg.fused_linear_build_proxy(hidden, weight, labels, bias=bias, k=4, chunk_size=7), want,
                exact=False)


def test_nan_row_stays_nan_and_no_grad_is_recorded():
    hidden, weight, bias, labels, *_ = make_linear(seed=4)
    hidden = hidden.clone().requires_grad_()
    with torch.no_grad():
        hidden[1, 2, 0] = float("nan")
    p = lpreg.fused_linear_build_proxy(hidden, weight, labels, bias=bias, k=4, chunk_size=5)
    assert not p.logq.requires_grad
    assert p.logq[1, 2].isnan().all() and p.coverage[1, 2].isnan() and p.label_logq[1, 2].isnan()
    others = torch.ones(labels.shape, dtype=torch.bool)
    others[1, 2] = False
    assert torch.isfinite(p.coverage[others]).all()


@pytest.mark.parametrize("kw,name", [(dict(k=0), "k"), (dict(temperature=0.0), "temperature"),
                                     (dict(mode="top_p"), "mode"), (dict(chunk_size=0), "chunk_size"),
                                     (dict(backend="gpu"), "backend")])
def test_bad_arguments_name_the_argument(kw, name):
    hidden, weight, bias, labels, *_ = make_linear(seed=5)
    with pytest.raises(ValueError, match=name):
        lpreg.fused_linear_build_proxy(hidden, weight, labels, bias=bias, **kw)


def test_bad_shapes_name_the_argument():
    hidden, weight, bias, labels, *_ = make_linear(seed=5)
    with pytest.raises(ValueError, match="weight must have the dtype of hidden"):
        lpreg.fused_linear_build_proxy(hidden, weight.double(), labels)
    with pytest.raises(ValueError, match="labels must have shape"):
        lpreg.fused_linear_build_proxy(hidden, weight, labels[:, :-1])
    with pytest.raises(ValueError, match="bias must be None or a tensor of shape"):
        lpreg.fused_linear_build_proxy(hidden, weight, labels, bias=bias[:-1])


def test_fused_paths_ignore_an_enclosing_autocast_region():
    """Inside torch.autocast(bf16) the chunk products stay fp32: the statistics, their gradients, the
    proxy record and the fused loss are bitwise those computed outside (before: the products ran in
    bf16, silently, and the log-probs moved by ~1e-2)."""
    hidden, weight, bias, labels, adv, old, mask = make_linear(seed=6)

    def run():
        h, w, b = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
        st = lpreg.fused_linear_token_stats(h, w, labels, bias=b, chunk_size=7)
        (st.logp.sum() + st.kl.sum() + st.entropy.sum()).backward()
        proxy = lpreg.fused_linear_build_proxy(hidden, weight, labels, bias=bias, chunk_size=7)
        h2, w2, b2 = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
        loss, _ = lpreg.fused_linear_policy_loss(h2, w2, labels, adv, old, mask, bias=b2, chunk_size=7, rho=0.5)
        loss.backward()
        return [*st, h.grad, w.grad, b.grad, *proxy, loss, h2.grad, w2.grad, b2.grad]

    outside = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = run()
    for i, (a, b) in enumerate(zip(inside, outside)):
        assert a.dtype == b.dtype and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)), i
