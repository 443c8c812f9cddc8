"""`build_proxy` goes through its custom op (`lpreg::build_proxy`) and the backend table, like every op."""

import pytest
import torch

import lpreg
from lpreg._sparse_proxy_ops import build_proxy_op
from tests.backends import ALL, runnable

BACKENDS = list(ALL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_build_proxy_op(backend):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 33, generator=g) * 3
    labels = torch.tensor([0, 7, -100, 32, 5])
    for lab in (labels, None):
        torch.library.opcheck(build_proxy_op, (x, lab, 1.0, False, -3.9, 4, -100, backend))


def test_every_backend_gives_the_same_proxy():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 50, generator=g) * 4
    labels = torch.randint(0, 50, (3, 7), generator=g)
    ref = lpreg.build_proxy(x, labels=labels, k=8, backend="torch")
    for backend in runnable(*BACKENDS[1:]):
        got = lpreg.build_proxy(x, labels=labels, k=8, backend=backend)
        for a, b in zip(got, ref):
            assert torch.equal(a, b), backend


def test_bad_backend_names_the_argument():
    with pytest.raises(ValueError, match="backend"):
        lpreg.build_proxy(torch.randn(2, 5), backend="gpu")
    with pytest.raises(ValueError, match="backend='cuda'"):
        lpreg.build_proxy(torch.randn(2, 5), backend="cuda")


def test_compiles_without_graph_breaks():
    x = torch.randn(4, 30)
    labels = torch.randint(0, 30, (4,))
    want = lpreg.build_proxy(x, labels=labels, k=5)
    got = torch.compile(lambda a, b: lpreg.build_proxy(a, labels=b, k=5), fullgraph=True, backend="eager")(x, labels)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
