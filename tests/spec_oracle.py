"""docs/spec.md §1-§2 evaluated literally in float64: the ground truth for every backend.

Independent of lpreg's code on purpose: probabilities are materialised, the kept set is
the table of docs/spec.md §1, and gradients are the closed forms of docs/spec.md §2.
"""

import math

import torch

import lpreg

OUTPUTS = ("logp", "proxy_logp", "kl", "entropy")


def spec_transform(raw, logit_scale=1.0, logit_softcap=None):
    """docs/spec.md "The logit transform" in float64: (z, dz/dx) of raw logits x,
    z = c tanh(s x / c), dz/dx = s (1 - tanh^2(s x / c)) with a soft-cap c; z = s x, dz/dx = s without."""
    raw = raw.double()
    if logit_softcap is None:
        return raw * logit_scale, torch.full_like(raw, float(logit_scale))
    t = torch.tanh(raw * logit_scale / logit_softcap)
    return logit_softcap * t, logit_scale * (1.0 - t * t)


def spec_token_stats(logits, labels, *, temperature=1.0, mode="min_p", threshold=0.02,
                     proxy_logits=None, ignore_index=-100, logit_scale=1.0, logit_softcap=None):
    """Returns dict of float64 (N,) tensors plus p, q, log p for the gradient; rows flattened.
    logit_scale, logit_softcap: the logit transform applied to the raw logits (and the proxy's)
    before the temperature; "dzdx" is its derivative, for the chain rule in spec_grad."""
    V = logits.shape[-1]
    z, dzdx = spec_transform(logits.detach().reshape(-1, V), logit_scale, logit_softcap)
    x = z / temperature
    y = x if proxy_logits is None else spec_transform(proxy_logits.detach().reshape(-1, V), logit_scale,
                                                      logit_softcap)[0] / temperature
    lse = torch.logsumexp(x, -1)
    logp = x - lse[:, None]
    p = logp.exp()
    entropy = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
    ymax = y.amax(-1, keepdim=True)
    if mode == "min_p":
        kept = y >= ymax + math.log(threshold)
    else:
        kept = y >= torch.logsumexp(y, -1, keepdim=True) + math.log(threshold)
        first_argmax = torch.zeros_like(kept).scatter_(-1, y.argmax(-1, keepdim=True), True)
        kept = torch.where(kept.any(-1, keepdim=True), kept, first_argmax)
    lse_kept = torch.logsumexp(torch.where(kept, y, torch.full_like(y, -math.inf)), -1)
    logq = torch.where(kept, y - lse_kept[:, None], torch.full_like(y, -math.inf))
    q = logq.exp()
    kl = torch.where(kept, q * (logq - logp), torch.zeros_like(q)).sum(-1)
    out = {"kl": kl, "entropy": entropy, "p": p, "q": q, "logp_all": logp, "kept": kept, "dzdx": dzdx}
    if labels is not None:
        lab = labels.reshape(-1)
        valid = lab != ignore_index
        safe = torch.where(valid, lab, torch.zeros_like(lab)).long()[:, None]
        out["logp"] = torch.where(valid, logp.gather(-1, safe)[:, 0], 0.0)
        out["proxy_logp"] = torch.where(valid, logq.gather(-1, safe)[:, 0], 0.0)
        for k in ("kl", "entropy"):
            out[k] = torch.where(valid, out[k], 0.0)
        out["valid"] = valid
        out["onehot"] = torch.zeros_like(p).scatter_(-1, safe, 1.0)
    return out


def spec_grad(ref, g_logp=None, g_kl=None, g_entropy=None, *, temperature=1.0):
    """docs/spec.md §2: grad_z = (g_logp (e_y - p) + g_kl (p - q) - g_H p (log p + H)) / T, then the
    chain rule through the logit transform: grad_x = grad_z dz/dx."""
    p, q = ref["p"], ref["q"]
    grad = torch.zeros_like(p)
    if g_logp is not None:
        grad += g_logp.reshape(-1, 1).double() * (ref["onehot"] - p)
    if g_kl is not None:
        grad += g_kl.reshape(-1, 1).double() * (p - q)
    if g_entropy is not None:
        plogp = torch.where(p > 0, p * (ref["logp_all"] + ref["entropy"][:, None]), torch.zeros_like(p))
        grad -= g_entropy.reshape(-1, 1).double() * plogp
    if "valid" in ref:
        grad = torch.where(ref["valid"][:, None], grad, 0.0)
    return grad / temperature * ref["dzdx"]


def make_logits(rows, V, *, seed=0, neg_inf=True):
    """Rows that exercise the filter: peaked (a few dominant tokens + a low tail), flat,
    and plain random; with some -inf (masked vocabulary) entries when V allows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, V, generator=g)
    for r in range(rows):
        kind = r % 3
        if kind == 0:  # peaked: 1-4 tokens well above a noise floor
            k = min(V, 1 + r % 4)
            idx = torch.randperm(V, generator=g)[:k]
            x[r, idx] += torch.linspace(8.0, 5.0, k)
        elif kind == 1:  # flat: tiny spread, many tokens near the max
            x[r] *= 0.05
    if neg_inf and V >= 7:
        mask = torch.rand(rows, V, generator=g) < 0.1
        mask[:, 0] = False  # keep at least one finite entry per row
        x = x.masked_fill(mask, -math.inf)
        x[:, 0] = x[:, 0].clamp(min=-1.0)
    return x


def _transform_in_dtype(t, logit_scale, logit_softcap):
    if logit_softcap is None:
        return t if logit_scale == 1.0 else t * logit_scale
    return torch.tanh(t * (logit_scale / logit_softcap)) * logit_softcap


def eager_in_dtype(logits, labels, *, temperature, mode, threshold, proxy_logits=None, logit_scale=1.0,
                   logit_softcap=None):
    """What a user writes today, evaluated in the input dtype: the error budget for low precision.
    logits (N, V) requiring grad; labels (N,) in range. Returns logp, kl, entropy (N,)."""
    x = _transform_in_dtype(logits, logit_scale, logit_softcap) / temperature
    y = x.detach() if proxy_logits is None else _transform_in_dtype(
        proxy_logits.to(logits.dtype), logit_scale, logit_softcap) / temperature
    logp = torch.log_softmax(x, -1)
    p = logp.exp()
    py = torch.softmax(y, -1)
    kept = py >= (threshold * py.amax(-1, keepdim=True) if mode == "min_p" else threshold)
    kept |= torch.zeros_like(kept).scatter_(-1, y.argmax(-1, keepdim=True), True)
    logq = torch.log_softmax(y.masked_fill(~kept, -math.inf), -1)
    # masks go on the log terms (not the products) so -inf entries give finite gradients
    kl = (logq.exp() * torch.where(kept, logq - logp, 0)).sum(-1)
    entropy = -(p * torch.where(p > 0, logp, 0)).sum(-1)
    return logp.gather(-1, labels[:, None])[:, 0], kl, entropy


def assert_backend_matches_spec(backend, logits, labels, upstream, *, temperature, mode, threshold,
                                proxy_logits=None, device="cpu", ignore_index=-100, logit_scale=1.0,
                                logit_softcap=None):
    """Run lpreg on `backend` (forward + backward) and compare with docs/spec.md in float64.

    Outputs are fp32 computed from the exact input values, so they must agree to 1e-5 in
    every input dtype. The gradient is rounded to the input dtype: fp32 within fp32 rounding;
    bf16/fp16 within twice the error of eager PyTorch run in that dtype (house style).
    """
    V = logits.shape[-1]
    dtype = logits.dtype
    leaf = logits.detach().clone().requires_grad_()
    kw = dict(temperature=temperature, mode=mode, threshold=threshold, logit_scale=logit_scale,
              logit_softcap=logit_softcap)
    proxy_dev = None if proxy_logits is None else proxy_logits.to(device)
    out = lpreg.lpreg_token_stats(leaf.to(device), labels.to(device), backend=backend, proxy_logits=proxy_dev,
                                  ignore_index=ignore_index, **kw)
    out = type(out)(*(o.cpu() for o in out))
    ref = spec_token_stats(leaf, labels, proxy_logits=proxy_logits, ignore_index=ignore_index, **kw)
    for name in OUTPUTS:
        got = getattr(out, name)
        assert got.dtype == torch.float32 and got.shape == labels.shape, name
        torch.testing.assert_close(got.reshape(-1).double(), ref[name], rtol=1e-5, atol=1e-5, msg=name)

    g_logp, g_kl, g_h = (g.reshape(labels.shape).float() for g in upstream)
    (grad,) = torch.autograd.grad((out.logp * g_logp + out.kl * g_kl + out.entropy * g_h).sum(), leaf)
    want = spec_grad(ref, g_logp, g_kl, g_h, temperature=temperature)
    assert grad.dtype == dtype
    err = (grad.reshape(-1, V).double() - want).abs().max().item()
    if dtype == torch.float32:
        assert err <= 1e-6 + 1e-5 * want.abs().max().item(), err
        return
    # The kernels read the low-precision logits exactly and round only the gradient; eager
    # PyTorch in the same dtype rounds every intermediate. Allow twice its error.
    flat_labels = labels.reshape(-1)
    valid = flat_labels != ignore_index
    xe = leaf.detach().reshape(-1, V).clone().requires_grad_()
    e_logp, e_kl, e_h = eager_in_dtype(
        xe, flat_labels.clamp(min=0), proxy_logits=None if proxy_logits is None else proxy_logits.reshape(-1, V),
        **kw)
    terms = (e_logp * g_logp.reshape(-1).to(dtype) + e_kl * g_kl.reshape(-1).to(dtype)
             + e_h * g_h.reshape(-1).to(dtype))
    (eager_grad,) = torch.autograd.grad(torch.where(valid, terms, 0).sum(), xe)
    eager_err = (eager_grad.double() - want).abs().max().item()
    assert err <= 2 * eager_err, (err, eager_err)
