"""Bad input: a ValueError that names the argument and the value, for every public entry."""

import math

import pytest
import torch

import lpreg

X = torch.randn(2, 3, 11)
Y = torch.randint(0, 11, (2, 3))


@pytest.mark.parametrize("fn", [lpreg.lpreg_token_stats, lpreg.reference.lpreg_token_stats])
@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((X.long(), Y), {}, "logits must be a float tensor.*int64"),
        ((torch.tensor(1.0), Y), {}, "logits must have shape .*0-d"),
        ((torch.zeros(2, 0), torch.zeros(2, dtype=torch.long)), {}, "non-empty vocabulary.*\\(2, 0\\)"),
        ((X, Y[:, :2]), {}, "labels must have shape .*\\(2, 3\\).*\\(2, 2\\)"),
        ((X, Y.float()), {}, "labels must be an integer tensor.*float32"),
        ((X, torch.full((2, 3), 11)), {}, "labels must be in \\[0, 11\\).*got 11"),
        ((X, torch.full((2, 3), -5)), {}, "labels must be in .*ignore_index=-100, got -5"),
        ((X, Y), {"temperature": 0.0}, "temperature must be .*got 0.0"),
        ((X, Y), {"temperature": -1.0}, "temperature must be .*got -1.0"),
        ((X, Y), {"temperature": math.nan}, "temperature must be .*got nan"),
        ((X, Y), {"threshold": 0.0}, "threshold must be in \\(0, 1\\] for mode='min_p', got 0.0"),
        ((X, Y), {"threshold": 1.5}, "threshold must be in \\(0, 1\\] for mode='min_p', got 1.5"),
        ((X, Y), {"mode": "fixed", "threshold": 1.0}, "threshold must be in \\(0, 1\\) for mode='fixed', got 1.0"),
        ((X, Y), {"mode": "top_p"}, "mode must be one of .*'top_p'"),
        ((X, Y), {"backend": "tpu"}, "backend must be one of .*'tpu'"),
        ((X, Y), {"proxy_logits": torch.randn(2, 3, 12)}, "proxy_logits must have the shape .*\\(2, 3, 12\\)"),
    ],
)
def test_bad_input_names_argument_and_value(fn, args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fn(*args, **kwargs)


@pytest.mark.parametrize("fn", [lpreg.lpreg_kl, lpreg.reference.lpreg_kl])
def test_unknown_reduction(fn):
    with pytest.raises(ValueError, match="reduction must be one of .*'avg'"):
        fn(X, reduction="avg")


def test_label_equal_to_custom_ignore_index_is_accepted():
    labels = Y.clone()
    labels[0, 0] = -1
    out = lpreg.lpreg_token_stats(X, labels, ignore_index=-1, backend="torch")
    assert out.logp[0, 0] == 0 and out.kl[0, 0] == 0


def test_explicit_backend_that_cannot_serve_the_device_says_so():
    with pytest.raises(ValueError, match="backend='cuda' needs cuda tensors, got a tensor on cpu"):
        lpreg.lpreg_token_stats(X, Y, backend="cuda")
