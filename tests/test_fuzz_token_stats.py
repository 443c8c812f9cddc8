"""Property-based tests of lpreg_token_stats / lpreg_kl on every backend here (issue 8).

Each example draws a batch (N 0..9 rows, V log-uniform in 1..70,000; the interpreted Triton
backend gets N <= 5 and V <= 256), a dtype, a logit scale from 1e-3 to 100, -inf masks over
1%..99% of a row, special rows (ignore_index, NaN, +inf, all -inf), a memory layout (3-D,
transposed, column-strided, row-strided, expanded), T in [0.1, 3], either mode with its
threshold anywhere in its legal range, an optional dense proxy, random upstream gradients, and a
logit transform (issue 30: a logit_scale in [0.05, 4] and / or a tanh soft-cap in [1, 50], identity
half of the time). Under a soft-cap, +inf and -inf are finite logits (+-c): a row holding them is an
ordinary row; a NaN stays NaN.

Checked on every example:
  - outputs and gradients of ordinary rows against the float64 oracle (tests/spec_oracle.py);
  - ignored rows: all four outputs exactly 0 and a gradient row of exact zeros;
  - rows holding NaN, +inf or only -inf: all four outputs NaN, a gradient row with no finite
    entry, and nothing leaks into other rows;
  - the other rows are bitwise what they are in a batch of their own (a random subset,
    permuted, without the special rows): a row's result does not depend on its batch-mates;
  - every gradient is finite wherever the oracle's is.

The contract for +inf (docs/spec.md §4 asks to define it): a row holding +inf gives NaN for
that row only, exactly like a NaN row. Every backend does this today; this file pins it.
"""

import math
from typing import NamedTuple, Optional

import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import lpreg
from tests.backends import ALL, runnable
from tests.fuzz_profiles import fuzz
from tests.spec_oracle import spec_grad, spec_token_stats, spec_transform

BACKENDS = runnable(*ALL)
MAX_V = {"torch": 70_000, "cpu": 70_000, "triton": 256}  # the interpreter runs numpy per block
MAX_N = {"torch": 9, "cpu": 9, "triton": 5}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# a row's result is bitwise the same whatever its batch-mates (issue 8 asks it of "cpu"; each
# Triton program is one row); "torch" is within rounding of it (see _check)
BITWISE_BATCH_INVARIANT = {"cpu", "triton"}
LAYOUTS = ["contiguous", "3d", "transposed", "col_strided", "row_padded", "expanded"]
EPS32 = torch.finfo(torch.float32).eps
F32_MAX = torch.finfo(torch.float32).max



class Case(NamedTuple):
    N: int
    V: int
    base: torch.Tensor  # the leaf the view is taken from (input dtype)
    layout: str
    shape: tuple  # leading shape of the view
    labels: torch.Tensor  # (N,) int64
    kinds: list  # per row: "ok", "ignore", "nan", "posinf", "allneg"
    proxy: Optional[torch.Tensor]  # (N, V) or None
    temperature: float
    mode: str
    threshold: float
    ignore_index: int
    upstream: tuple  # (g_logp, g_kl, g_entropy), each (N,) fp32 or None
    logit_scale: float = 1.0
    logit_softcap: Optional[float] = None


def _log_uniform_int(draw, lo, hi):
    return min(hi, max(lo, int(math.exp(draw(st.floats(math.log(lo), math.log(hi + 1)))))))


@st.composite
def cases(draw, backend, with_labels=True):
    N = draw(st.integers(0, MAX_N[backend]))
    V = _log_uniform_int(draw, 1, MAX_V[backend])
    dtype = draw(st.sampled_from(DTYPES))
    near_max = draw(st.booleans()) if draw(st.integers(0, 9)) == 0 else False
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    temperature = draw(st.floats(0.1, 3.0))
    logit_softcap = draw(st.one_of(st.none(), st.none(), st.floats(1.0, 50.0)))
    logit_scale = 1.0
    if not near_max and draw(st.booleans()):  # near the dtype's max a multiplier could overflow fp32
        logit_scale = math.exp(draw(st.floats(math.log(0.05), math.log(4.0))))
    capped = logit_softcap is not None
    if near_max:
        # values near the dtype's maximum (their spread overflows fp32: x - max is -inf), with
        # |z|/T inside the fp32 range, the documented domain (docs/spec.md §4; its edge is pinned
        # in tests/test_fuzz_regressions.py)
        top = torch.finfo(dtype).max
        if dtype != torch.float16:
            top = top * min(1.0, temperature) * 0.99
        z = (torch.rand(N, V, generator=g) * 2 - 1) * top
    else:
        scale = math.exp(draw(st.floats(math.log(1e-3), math.log(100.0))))
        z = torch.randn(N, V, generator=g) * scale
        if V > 1 and draw(st.booleans()):  # peaked rows: a few tokens well above the rest
            k = draw(st.integers(1, min(V, 4)))
            idx = torch.randint(0, V, (N, k), generator=g)
            z.scatter_add_(-1, idx, torch.full((N, k), 6.0 * max(scale, 1.0)))
    mask_frac = draw(st.sampled_from([0.0, 0.0, 0.01, 0.1, 0.5, 0.9, 0.99]))
    if mask_frac and V > 1:
        masked = torch.rand(N, V, generator=g) < mask_frac
        keep = torch.randint(0, V, (N,), generator=g)
        masked[torch.arange(N), keep] = False  # every ordinary row keeps one finite entry
        z = z.masked_fill(masked, -math.inf)
    z = z.to(dtype)

    layout = draw(st.sampled_from(LAYOUTS))
    kinds = ["ok"] * N
    if layout != "expanded":  # an expanded view repeats one row: no per-row special values
        for r in range(N):
            specials = ["nan"] if capped else ["nan", "posinf", "allneg"]  # a soft-cap makes +-inf finite
            specials = (["ignore"] if with_labels else []) + specials
            kinds[r] = draw(st.sampled_from(["ok"] * 6 + specials))
    ignore_index = draw(st.sampled_from([-100, -1, 0]))
    labels = torch.randint(0, V, (N,), generator=g)
    if V > 1 and N and draw(st.booleans()):
        labels = torch.where(torch.rand(N, generator=g) < 0.5, z.float().argmax(-1), labels)
    if ignore_index == 0:
        labels = labels.clamp(min=min(1, V - 1))  # label 0 would be an ignored row
    for r, kind in enumerate(kinds):
        col = int(torch.randint(0, V, (1,), generator=g))
        if kind == "ignore":
            labels[r] = ignore_index
            if draw(st.booleans()):  # whatever an ignored row holds: huge, NaN, +inf
                z[r, col] = draw(st.sampled_from([1e4, math.nan, math.inf, -math.inf]))
        elif kind == "nan":
            z[r, col] = math.nan
        elif kind == "posinf":
            z[r, col] = math.inf
        elif kind == "allneg":
            z[r] = -math.inf
    if layout == "expanded" and N:
        z = z[:1].expand(N, V).clone()
    base = _make_base(z, layout)

    proxy = None
    if draw(st.booleans()):
        pscale = math.exp(draw(st.floats(math.log(1e-3), math.log(30.0))))
        proxy = (z.float().nan_to_num(0.0, 0.0, 0.0) + torch.randn(N, V, generator=g) * pscale)
        if draw(st.booleans()):  # the proxy's own masked vocabulary (never a whole row)
            pm = torch.rand(N, V, generator=g) < draw(st.sampled_from([0.01, 0.5, 0.99]))
            pm[:, 0] = False
            proxy = proxy.masked_fill(pm, -math.inf)
        proxy = proxy.to(draw(st.sampled_from(DTYPES)))
        # a cast to fp16 can overflow a proxy row to +inf, or all of it to -inf (a proxy that keeps
        # nothing): either poisons its row (docs/spec.md §4), unless a soft-cap makes them finite
        for r in range(N):
            overflowed = bool((proxy[r] == math.inf).any() or (proxy[r] == -math.inf).all())
            if kinds[r] == "ok" and overflowed and not capped:
                kinds[r] = "nan"
        if N and draw(st.integers(0, 4)) == 0:  # a NaN or +inf in the proxy poisons only its row
            r = draw(st.integers(0, N - 1))
            proxy[r, 0] = draw(st.sampled_from([math.nan] if capped else [math.nan, math.inf]))
            if kinds[r] == "ok":
                kinds[r] = "nan"
    mode = draw(st.sampled_from(["min_p", "fixed"]))
    if mode == "min_p":
        threshold = draw(st.one_of(st.just(1.0), st.floats(0.0, 1.0, exclude_min=True)))
    else:
        threshold = draw(st.floats(0.0, 1.0, exclude_min=True, exclude_max=True))
    ups = []
    for used in draw(st.sampled_from([(1, 1, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0)])):
        ups.append(torch.randn(N, generator=g) * draw(st.sampled_from([1.0, 1e-3, 50.0])) if used else None)
    if not with_labels:  # lpreg_kl: the KL is the only output
        ups = [None, torch.randn(N, generator=g), None]
    lead = (1, N) if layout == "3d" else (N,)
    return Case(N, V, base, layout, lead, labels if with_labels else None, kinds, proxy, temperature, mode, threshold,
                ignore_index, tuple(ups), logit_scale, logit_softcap)


def _make_base(z, layout):
    """A leaf in the input dtype whose view (`_view`) holds z in the given layout."""
    N, V = z.shape
    if layout == "transposed":  # (V, N) storage: vocabulary stride N
        return z.t().contiguous().requires_grad_()
    if layout == "col_strided":  # every other column of (N, 2V): vocabulary stride 2
        wide = torch.zeros(N, 2 * V, dtype=z.dtype)
        wide[:, ::2] = z
        return wide.requires_grad_()
    if layout == "row_padded":  # unit-stride rows, row stride V + 3
        wide = torch.zeros(N, V + 3, dtype=z.dtype)
        wide[:, 1:V + 1] = z
        return wide.requires_grad_()
    if layout == "expanded":  # one row seen N times (row stride 0)
        return (z[:1] if N else z).clone().requires_grad_()
    return z.clone().requires_grad_()


def _view(case):
    b, layout, N, V = case.base, case.layout, case.N, case.V
    if layout == "transposed":
        return b.t()
    if layout == "col_strided":
        return b[:, ::2]
    if layout == "row_padded":
        return b[:, 1:V + 1]
    if layout == "expanded":
        return b.expand(N, V)
    if layout == "3d":
        return b.reshape(1, N, V)
    return b[:]  # a view of the leaf, which autograd.grad can target like the others


def _run(backend, case, rows=None, kl_only=False):
    """Forward + backward on the rows `rows` (all by default). Returns (outputs (4, n) fp32,
    grad (n, V) in the input dtype, the logits seen (n, V))."""
    z = _view(case)
    N, V = case.N, case.V
    z2 = z.reshape(N, V)
    idx = torch.arange(N) if rows is None else rows
    x = z2[idx] if rows is not None else z
    lab = None if case.labels is None else case.labels[idx]
    proxy = None if case.proxy is None else case.proxy[idx]
    kw = dict(temperature=case.temperature, mode=case.mode, threshold=case.threshold, backend=backend,
              logit_scale=case.logit_scale, logit_softcap=case.logit_softcap)
    if rows is None and case.layout == "3d":
        lab = None if lab is None else lab.reshape(case.shape)
        proxy = None if proxy is None else proxy.reshape(*case.shape, V)
    if kl_only:
        kl = lpreg.lpreg_kl(x, proxy_logits=proxy, **kw)
        outs = [torch.zeros_like(kl), torch.zeros_like(kl), kl, torch.zeros_like(kl)]
    else:
        outs = list(lpreg.lpreg_token_stats(x, lab, proxy_logits=proxy, ignore_index=case.ignore_index, **kw))
    terms = [o.reshape(-1) * u[idx] for o, u in zip([outs[0], outs[2], outs[3]], case.upstream) if u is not None]
    loss = sum(t.sum() for t in terms) if terms else None
    if loss is None or not loss.requires_grad:
        grad = torch.zeros(len(idx), V, dtype=z.dtype)
    else:
        (grad,) = torch.autograd.grad(loss, x)
    return torch.stack([o.reshape(-1) for o in outs]), grad.reshape(-1, V), x.detach().reshape(-1, V)


def _ambiguous(x, proxy, case):
    """True when fp32 rounding of z/T could move a token across the filter's cutoff (or swap
    the first argmax under the 'fixed' fallback): the kept set is then not determined by the
    float64 oracle alone. Margin: 1e-5 (1 + |y|max), about 80 fp32 ulps of the largest scaled
    logit, covering the rounding of 1/T, of z/T and of the logsumexp that sets the cutoff."""
    y = spec_transform(x if proxy is None else proxy, case.logit_scale, case.logit_softcap)[0] / case.temperature
    y = torch.where(torch.isfinite(y), y, torch.full_like(y, -math.inf))
    ymax = y.amax(-1, keepdim=True)
    margin = 1e-5 * (1 + ymax.abs().clamp(max=1e300))
    if case.mode == "min_p":
        cut = ymax + math.log(case.threshold)
    else:
        cut = torch.logsumexp(y, -1, keepdim=True) + math.log(case.threshold)
        top2 = y.topk(min(2, y.shape[-1]), -1).values
        if y.shape[-1] > 1 and bool(((top2[:, :1] - top2[:, 1:]).abs() <= margin).any()):
            return True
    near = ((y - cut).abs() <= margin) & (y != ymax)  # a maximum sits at y - ymax = 0 in any precision
    return bool(near.any())


def _check(backend, case, kl_only=False):
    outs, grad, x = _run(backend, case, kl_only=kl_only)
    N, V = x.shape
    kinds = case.kinds
    valid = [case.labels is None or int(case.labels[r]) != case.ignore_index for r in range(N)]
    dtype = x.dtype

    # ---- special rows: ignored rows are zeros whatever they hold; NaN / +inf / all -inf rows NaN
    for r in range(N):
        if not valid[r]:
            assert bool((outs[:, r] == 0).all()), (r, outs[:, r])
            assert bool((grad[r] == 0).all()), ("ignored row gradient", r, grad[r])
        elif kinds[r] != "ok":
            got = outs[2:3, r] if kl_only else outs[:, r]
            assert bool(got.isnan().all()), (kinds[r], r, outs[:, r])
            assert not bool(grad[r].isfinite().any()) or not any(u is not None for u in case.upstream), (kinds[r], r)

    # ---- ordinary rows against the float64 oracle
    ok = [r for r in range(N) if valid[r] and kinds[r] == "ok"]
    if ok:
        sel = torch.tensor(ok)
        xp = x[sel]
        pp = None if case.proxy is None else case.proxy[sel]
        lab = None if case.labels is None else case.labels[sel]
        assume(not _ambiguous(xp, pp, case))
        tf = dict(logit_scale=case.logit_scale, logit_softcap=case.logit_softcap)
        ref = spec_token_stats(xp, lab, temperature=case.temperature, mode=case.mode, threshold=case.threshold,
                               proxy_logits=pp, ignore_index=case.ignore_index, **tf)
        # fp32 budget: z/T is formed in fp32 (2 roundings, relative), so every log-domain
        # output carries about eps32 * |x|max; x16 for the exp/log/lse roundings, plus 1e-5
        # (as tests/test_token_stats.py) for fp32 sums over up to 70,000 terms.
        # (with a transform: of z = transform(x), and a soft-cap's c, which bounds the error of its tanh)
        zs = [spec_transform(t, **tf)[0].abs() for t in ([xp] if pp is None else [xp, pp])]
        scaled = torch.cat(zs, -1) / case.temperature
        X = torch.where(torch.isfinite(scaled), scaled, torch.zeros_like(scaled)).amax(-1)
        if case.logit_softcap is not None:
            X = X + case.logit_softcap / case.temperature
        budget = 1e-5 + 16 * EPS32 * X
        names = ("logp", "proxy_logp", "kl", "entropy") if case.labels is not None else ("kl", "entropy")
        for name in names:
            i = ("logp", "proxy_logp", "kl", "entropy").index(name)
            got, want = outs[i, sel].double(), ref[name]
            if kl_only and name == "entropy":
                continue
            same_inf = torch.isinf(want) & (got == want)
            # a true value beyond the fp32 range rounds to the infinity of its sign
            same_inf |= (want.abs() > F32_MAX) & (got == want.sign() * math.inf)
            err = torch.where(same_inf, torch.zeros_like(got), (got - want).abs())
            assert bool((err <= budget + 1e-5 * want.abs()).all()), (name, got, want, budget)
        g_logp, g_kl, g_h = (None if u is None else u[sel] for u in case.upstream)
        want = spec_grad(ref, g_logp, g_kl, g_h, temperature=case.temperature)
        got = grad[sel].double()
        assert bool(got[want.isfinite()].isfinite().all()), "gradient not finite where the oracle's is"
        # gradient budget per element: the kernels round the fp32 gradient once to the input
        # dtype (<= eps/2 |g|; eps allows twice that: the house "2x" rule applied to the one
        # unavoidable rounding, plus a subnormal step), on top of the fp32 budget above times the
        # row's upstream weight G = |g_logp| + |g_kl| + |g_H| (2 + H) (|p (log p + H)| <= 1/e + p H).
        G = sum(u.abs().double() * (1 if j < 2 else (2 + ref["entropy"].abs()))
                for j, u in enumerate((g_logp, g_kl, g_h)) if u is not None)
        fin = torch.finfo(dtype)
        # through the transform: dz/dx <= s multiplies the budget; a soft-cap's 1 - tanh^2 formed in fp32
        # adds a few eps32 of G s / T
        slope = case.logit_scale * (budget + (8 * EPS32 if case.logit_softcap is not None else 0.0))
        tol = fin.eps * want.abs() + fin.smallest_normal * fin.eps + (G * slope / case.temperature)[:, None]
        bad = (got - want).abs() > tol
        assert not bool(bad.any()), ("gradient", (got - want).abs().max().item(), tol.min().item())

    # ---- batch independence: a permuted subset of the ordinary rows, in a batch of its own
    if ok and case.layout != "expanded":
        perm = torch.tensor(ok)[torch.randperm(len(ok), generator=torch.Generator().manual_seed(N))]
        sub = perm[: max(1, len(ok) - 1)]
        outs2, grad2, _ = _run(backend, case, rows=sub, kl_only=kl_only)
        a, b = outs2.nan_to_num(), outs[:, sub].nan_to_num()
        if backend in BITWISE_BATCH_INVARIANT:
            same = torch.equal(a, b) and torch.equal(grad2, grad[sub])
            assert same, "a row's outputs or gradient depend on its batch-mates"
        else:
            # torch's CPU reductions split a lone long row across threads but not a batch of
            # them: the summation order of the row's sums (fp32, <= 70,000 terms) changes with
            # the batch, ~1e-6 relative at most; a gradient may then round to the neighbouring
            # value of its dtype (eps |g|)
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
            g2, g1 = grad2.double(), grad[sub].double()
            tol = torch.finfo(dtype).eps * g1.abs() + 1e-6 * (g1.abs().amax(-1, keepdim=True) + 1e-30)
            assert bool(((g2 - g1).abs() <= tol).all()), "a row's gradient depends on its batch-mates"


@fuzz(60)
@given(case=cases("torch"))
def test_token_stats_torch(case):
    _check("torch", case)


@fuzz(60)
@given(case=cases("cpu"))
def test_token_stats_cpu(case):
    if "cpu" not in BACKENDS:
        raise AssertionError("the compiled CPU extension lpreg._C is not built")
    _check("cpu", case)


@fuzz(25)
@given(case=cases("triton"))
def test_token_stats_triton(case):
    _check("triton", case)


@fuzz(24)
@given(backend=st.sampled_from(BACKENDS), data=st.data())
def test_lpreg_kl(backend, data):
    _check(backend, data.draw(cases(backend, with_labels=False)), kl_only=True)
