"""A weight freed between the fused statistics' forward and backward (finding 7 of issue 23).

`fused_linear_token_stats` reads its saved weight again in backward (it recomputes the logits).
FSDP2 frees a resharded parameter by resizing its storage to 0 bytes and keeping its shape;
DeepSpeed ZeRO-3 replaces a released parameter's data by an empty tensor. Either way the backward
must raise a RuntimeError that says what happened, not read freed memory (a segfault on CPU).
"""

import pytest
import torch

import lpreg


def inputs(seed=0, N=6, H=4, V=11):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(V, H, generator=g))
    bias = torch.nn.Parameter(torch.randn(V, generator=g))
    labels = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, bias, labels


def test_weight_storage_freed_before_backward_raises():
    hidden, weight, bias, labels = inputs()
    st = lpreg.fused_linear_token_stats(hidden, weight, labels, bias=bias, chunk_size=4)
    weight.untyped_storage().resize_(0)  # what FSDP2's reshard after forward does
    with pytest.raises(RuntimeError, match=r"weight of shape \(11, 4\) needs 176 bytes of storage but its storage "
                                           r"holds 0 \(in the backward.*freed, as FSDP2 does"):
        st.logp.sum().backward()


def test_bias_storage_freed_before_backward_raises():
    hidden, weight, bias, labels = inputs(1)
    st = lpreg.fused_linear_token_stats(hidden, weight, labels, bias=bias)
    bias.untyped_storage().resize_(0)
    with pytest.raises(RuntimeError, match=r"bias of shape \(11,\) needs 44 bytes .* holds 0 \(in the backward"):
        (st.logp + st.entropy).sum().backward()


@pytest.mark.parametrize("fn", ["token_stats", "policy_loss", "build_proxy"])
def test_weight_storage_freed_before_forward_raises(fn):
    hidden, weight, bias, labels = inputs(2)
    weight.untyped_storage().resize_(0)
    with pytest.raises(RuntimeError, match=r"holds 0 \(in the forward\)"):
        if fn == "token_stats":
            lpreg.fused_linear_token_stats(hidden, weight, labels, bias=bias)
        elif fn == "build_proxy":
            lpreg.fused_linear_build_proxy(hidden, weight, labels, bias=bias)
        else:
            lpreg.fused_linear_policy_loss(hidden[None], weight, labels[None], torch.ones(1), None,
                                           torch.ones(1, labels.numel()), bias=bias)


def test_weight_view_past_a_shrunk_storage_raises():
    """A view whose storage still holds some bytes, but fewer than the view needs."""
    hidden, weight, bias, labels = inputs(3)
    st = lpreg.fused_linear_token_stats(hidden, weight, labels, bias=bias)
    weight.untyped_storage().resize_(weight.element_size() * 5)
    with pytest.raises(RuntimeError, match="needs 176 bytes of storage but its storage holds 20"):
        st.kl.sum().backward()


def test_weight_released_as_zero3_does_raises():
    """ZeRO-3 outside its gather: the parameter's data is an empty tensor (shape (0,))."""
    hidden, weight, bias, labels = inputs(4)
    st = lpreg.fused_linear_token_stats(hidden, weight, labels, bias=bias)
    weight.data = torch.empty(0)
    with pytest.raises(RuntimeError, match=r"weight had shape \(11, 4\) in the forward and has \(0,\).*ZeRO-3"):
        st.logp.sum().backward()


def test_intact_weight_still_trains():
    hidden, weight, bias, labels = inputs(5)
    st = lpreg.fused_linear_token_stats(hidden, weight, labels, bias=bias, chunk_size=4)
    st.logp.sum().backward()
    logits = (hidden @ weight.T + bias).detach().requires_grad_()
    want = torch.autograd.grad(torch.log_softmax(logits, -1).gather(1, labels[:, None]).sum(), logits)[0]
    torch.testing.assert_close(bias.grad, want.sum(0), rtol=1e-5, atol=1e-6)
