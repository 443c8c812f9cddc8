"""Baselines and defaults as published (issue 10 items 1-3), each against a float64 transcription of
its source: the off-policy Lp-Reg proxy, 80/20's normalisation, the entropy-bonus coefficient,
loss_agg_mode, and the off-policy default of clip_higher / kl_cov."""

import pytest
import torch

from lpreg.sparse_proxy import build_proxy
from lpreg.trainer.config import preset_config
from lpreg.trainer.losses import loss_denominator, method_loss, top_entropy_count

B, T, V = 3, 7, 11
# fp32 kernels vs a float64 transcription: sums of ~20 terms of size ~1, each with fp32 rounding
# (~1e-7 relative) through exp/log; 1e-5 leaves two orders of magnitude of headroom.
RTOL = 1e-5


def _inputs(seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * scale
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[0, 5:] = 0
    mask[2, :2] = 0
    labels = torch.where(mask > 0, labels, torch.full_like(labels, -100))
    adv = (torch.tensor([1.5, -0.7, -1.2])[:, None] * mask).contiguous()
    return logits, labels, adv, mask


def _logp64(logits, labels):
    lp = torch.log_softmax(logits.double(), -1)
    return lp.gather(-1, labels.clamp(min=0)[..., None])[..., 0], lp


def _close(a, b, what):
    a, b = float(torch.as_tensor(a).detach()), float(torch.as_tensor(b).detach())
    assert abs(a - b) <= RTOL * max(1.0, abs(b)), f"{what}: {a} vs {b}"


# --- item 1 and item 3's off-policy default -------------------------------------------------------

def test_published_defaults():
    cfg = preset_config("cpu-tiny")
    assert cfg.lpreg_compat == "released" and cfg.entropy_coef == 0.002 and cfg.mini_batches == 1
    # Table 1 ran clip_higher and kl_cov with 8 updates per rollout (cpu-tiny: 16 prompts / 8)
    for loss in ("clip_higher", "kl_cov"):
        assert preset_config("cpu-tiny", loss=loss).mini_batches == 8
        assert preset_config("test-micro", loss=loss).mini_batches == 2  # 2 prompts: the most there is
        with pytest.raises(ValueError, match=f"--loss {loss} with --mini-batches 1"):
            preset_config("cpu-tiny", loss=loss, mini_batches=1)
    assert preset_config("cpu-tiny", loss="clip_higher", mini_batches=4).mini_batches == 4
    with pytest.raises(ValueError, match="loss-agg-mode.*'seq-mean'"):
        preset_config("cpu-tiny", loss_agg_mode="seq-mean")


def test_on_policy_clip_higher_and_kl_cov_are_exactly_grpo():
    """Why they refuse --mini-batches 1: at r = 1 neither the ratio clip nor |logp - old_logp| acts, so
    the gradient is -A d(logp), GRPO's (transcribed: d/dz of -A exp(logp - stopgrad(logp)))."""
    logits, labels, adv, mask = _inputs(seed=1)
    grads = {}
    for loss in ("grpo", "clip_higher", "kl_cov"):
        cfg = preset_config("cpu-tiny", loss=loss, kl_cov_ratio=0.5, token_stats_backend="torch")
        x = logits.clone().requires_grad_(True)
        num, _ = method_loss(loss, x, labels, adv, None, mask, cfg)
        num.backward()
        grads[loss] = x.grad
    xr = logits.double().requires_grad_(True)
    logp, _ = _logp64(xr, labels)
    (-(adv.double() * torch.exp(logp - logp.detach())) * mask).sum().backward()
    for loss, g in grads.items():
        # fp32 softmax gradients of O(1) entries; 1e-6 is a few fp32 ulps
        torch.testing.assert_close(g.double(), xr.grad, atol=1e-6, rtol=1e-5, msg=loss)


# --- item 3: 80/20 --------------------------------------------------------------------------------

def test_top_entropy_count_is_exact_ceil():
    assert [top_entropy_count(n, 0.2) for n in (1, 4, 5, 6, 15, 16, 100)] == [1, 1, 1, 2, 3, 4, 20]
    assert top_entropy_count(3, 1.0) == 3


def test_80_20_is_a_token_mean_over_the_selected_tokens():
    """Authors' code: loss_mask = response_mask & (entropy in the top 20%), then the token-mean of the
    DAPO clip-higher surrogate over that mask; k = ceil(0.2 n)."""
    cfg = preset_config("cpu-tiny", loss="80_20", token_stats_backend="torch")
    logits, labels, adv, mask = _inputs(seed=2)
    old = (_logp64(logits, labels)[0] + 0.3 * torch.randn(B, T, dtype=torch.float64,
                                                         generator=torch.Generator().manual_seed(9))).float()
    x = logits.clone().requires_grad_(True)
    num, sums = method_loss("80_20", x, labels, adv, old, mask, cfg)
    n = int(mask.sum())
    loss = num / loss_denominator(cfg, [mask], [None], n)
    loss.backward()

    xr = logits.double().requires_grad_(True)
    logp, lp = _logp64(xr, labels)
    ent = -(lp.exp() * lp).sum(-1).detach()
    k = -(-n // 5)  # ceil(0.2 n)
    valid = mask > 0
    order = sorted(torch.nonzero(valid.reshape(-1)).reshape(-1).tolist(), key=lambda i: -float(ent.reshape(-1)[i]))
    sel = torch.zeros(B * T, dtype=torch.float64)
    sel[order[:k]] = 1.0
    sel = sel.reshape(B, T)
    r = torch.exp(logp - old.double())
    a = adv.double()
    ppo = torch.maximum(-a * r, -a * r.clamp(1 - 0.2, 1 + 0.28))
    ref = (ppo * sel).sum() / sel.sum()
    ref.backward()
    _close(loss, ref, "80_20 loss")
    torch.testing.assert_close(x.grad.double(), xr.grad, atol=1e-6, rtol=1e-5)  # fp32 grads, as above
    assert int(sums["actor/selected_frac"]) == k


# --- item 3: entropy bonus ------------------------------------------------------------------------

def test_entropy_bonus_uses_the_papers_coefficient():
    cfg = preset_config("cpu-tiny", loss="entropy_bonus", token_stats_backend="torch")
    logits, labels, adv, mask = _inputs(seed=3)
    num, _ = method_loss("entropy_bonus", logits, labels, adv, None, mask, cfg)
    logp, lp = _logp64(logits, labels)
    ent = -(lp.exp() * lp).sum(-1)
    ref = ((-adv.double() - 0.002 * ent) * mask).sum()  # on-policy r = 1: -A - 0.002 H per token
    _close(num, ref, "entropy_bonus")


# --- item 3: loss_agg_mode ------------------------------------------------------------------------

def _agg(per_token, mask, mode):
    """verl's agg_loss, transcribed."""
    if mode == "token-mean":
        return (per_token * mask).sum() / mask.sum()
    seq = (per_token * mask).sum(-1)
    if mode == "seq-mean-token-mean":
        seq = seq / mask.sum(-1)
    return seq.mean()


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_loss_agg_mode_is_honoured(mode):
    logits, labels, adv, mask = _inputs(seed=4)
    old = _logp64(logits, labels)[0].float() - 0.2 * mask  # r = e^0.2: inside GRPO's clip on one side only
    cfg = preset_config("cpu-tiny", loss="grpo", loss_agg_mode=mode, token_stats_backend="torch")
    num, _ = method_loss("grpo", logits, labels, adv, old, mask, cfg)
    got = num / loss_denominator(cfg, [mask], [None], int(mask.sum()))
    logp, _ = _logp64(logits, labels)
    r = torch.exp(logp - old.double())
    a = adv.double()
    per = torch.maximum(-a * r, -a * r.clamp(0.8, 1.2))
    _close(got, _agg(per, mask.double(), mode), f"grpo {mode}")
    # Lp-Reg: the package's own aggregation, split into two micro-batches that sum to it
    cfg = preset_config("cpu-tiny", loss="lpreg", loss_agg_mode=mode, lpreg_rho=0.5, token_stats_backend="torch")
    from lpreg.policy_loss import lpreg_policy_loss

    ref, _ = lpreg_policy_loss(logits, labels, adv, old, mask, compat="released", rho=0.5, loss_agg_mode=mode,
                               backend="torch")
    parts = [slice(0, 3)]  # released selects per call, so one call holds the whole batch here
    den = loss_denominator(cfg, [mask[p] for p in parts], [None], int(mask.sum()))
    total = sum(method_loss("lpreg", logits[p], labels[p], adv[p], old[p], mask[p], cfg)[0] for p in parts) / den
    _close(total, ref, f"lpreg {mode}")


# --- item 2: the off-policy proxy ----------------------------------------------------------------

def _lpreg_off_policy_ref(z, z_old, labels, adv, old, mask, rho, compat):
    """Lp-Reg with q built from the ROLLOUT policy z_old (docs/spec.md §1, §3), T = 1, min-p 0.02."""
    logp, lp = _logp64(z, labels)
    lq = z_old.double()
    kept = lq >= lq.max(-1, keepdim=True).values + torch.log(torch.tensor(0.02, dtype=torch.float64))
    logq = torch.where(kept, lq - torch.logsumexp(lq.masked_fill(~kept, float("-inf")), -1, keepdim=True),
                       torch.tensor(float("-inf"), dtype=torch.float64))
    q_y = logq.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    a, valid = adv.double(), mask > 0
    r = torch.exp(logp - old.double())
    pg1, pg2 = -a * r, -a * r.clamp(0.0, 10.0)
    flat_lp = logp.detach().reshape(-1)
    if compat == "released":
        pool = [i for i in range(B * T) if valid.reshape(-1)[i] and a.reshape(-1)[i] < 0]
        k = max(1, int(rho * len(pool)))
        low = sorted(pool, key=lambda i: (float(flat_lp[i]), i))[:k] if k > 1 else []
    else:
        pool = [i for i in range(B * T) if valid.reshape(-1)[i]]
        low = sorted(pool, key=lambda i: (float(flat_lp[i]), i))[: max(1, int(rho * len(pool)))]
    bottom = torch.zeros(B * T, dtype=torch.bool)
    bottom[low] = True
    bottom = bottom.reshape(B, T)
    if compat == "released":
        sel = bottom & (logp.detach() < q_y)
        d = (q_y - logp).clamp(-20, 20)
        div = (torch.exp(d) - d - 1).clamp(-10, 10)
        pg = torch.where(sel, pg1, torch.maximum(pg1, pg2))
    else:
        sel = bottom & (a < 0) & (q_y > float("-inf"))
        q = logq.exp()
        div = (q * (logq - lp)).nan_to_num(nan=0.0).sum(-1)  # 0 * (-inf) terms are 0: q_i = 0 outside K
        pg = torch.maximum(pg1, pg2)
    per = pg + torch.where(sel, div, torch.zeros_like(div))
    return (per * mask).sum() / mask.sum(), int(sel.sum())


# released: k3 reads only the label's log q, which the proxy holds exactly (labels=), so even k = 2
# (most kept labels outside the top-k) is exact; paper: the full KL needs every kept entry, k = 64 > V
@pytest.mark.parametrize("compat, k", [("released", 2), ("released", 64), ("paper", 64)])
def test_off_policy_sparse_proxy_equals_dense_rollout_logits(compat, k):
    """--mini-batches > 1: q comes from the rollout policy, recorded once as a sparse proxy; the
    trainer's loss with it equals the loss with the dense rollout-policy logits, and both equal the
    float64 transcription."""
    z_old, labels, adv, mask = _inputs(seed=5, scale=1.0)
    z = z_old + 0.5 * torch.randn(B, T, V, generator=torch.Generator().manual_seed(6))  # the policy moved
    old = _logp64(z_old, labels)[0].float()
    cfg = preset_config("cpu-tiny", loss="lpreg", lpreg_compat=compat, lpreg_rho=0.5, mini_batches=2,
                        lpreg_proxy_k=k, token_stats_backend="torch")
    proxy = build_proxy(z_old, labels=labels, temperature=cfg.temperature, mode=cfg.lpreg_mode,
                        threshold=cfg.lpreg_threshold, k=cfg.lpreg_proxy_k)
    n = float(mask.sum())
    results = {}
    for name, q in (("sparse", proxy), ("dense", z_old)):
        x = z.clone().requires_grad_(True)
        num, sums = method_loss("lpreg", x, labels, adv, old, mask, cfg, proxy=q)
        (num / n).backward()
        results[name] = (num / n, x.grad, sums["lpreg_n_sel"])
    zr = z.double().requires_grad_(True)
    ref, n_sel = _lpreg_off_policy_ref(zr, z_old, labels, adv, old, mask, 0.5, compat)
    ref.backward()
    assert n_sel > 0  # the penalty is part of what is compared
    for name, (loss, grad, sel) in results.items():
        _close(loss, ref, f"{name} proxy loss")
        torch.testing.assert_close(grad.double(), zr.grad, atol=1e-6, rtol=1e-5, msg=name)  # fp32 grads
        assert int(round(float(sel))) == n_sel


def test_scoring_pass_proxy_captures_every_kept_sampled_label():
    """The trainer builds the off-policy proxy with labels=, so a kept label outside the top-k is
    still recorded (else its log q is -inf and Lp-Reg can never select it)."""
    from types import SimpleNamespace

    from lpreg.trainer.model import build_tiny_model
    from lpreg.trainer.rollout import pack
    from lpreg.trainer.scoring import _score
    from lpreg.trainer.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    model = build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=2, seed=0)  # random: flat rows
    g = torch.Generator().manual_seed(0)
    responses = [torch.randint(4, len(tok), (6,), generator=g).tolist() for _ in range(4)]
    batch = pack([[10, 11, 12]] * 4, responses, tok.pad_token_id)
    cfg = preset_config("test-micro", loss="lpreg", mini_batches=2, lpreg_proxy_k=1, token_stats_backend="torch")
    _, _, proxies = _score(SimpleNamespace(cfg=cfg, model=model), batch, [torch.arange(4)])
    with torch.no_grad():
        z = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].double()
    kept = z >= z.max(-1, keepdim=True).values + torch.log(torch.tensor(0.02, dtype=torch.float64))
    valid = batch.labels != -100
    y = batch.labels.clamp(min=0)[..., None]
    label_kept = kept.gather(-1, y)[..., 0] & valid
    exact = (z - torch.logsumexp(z.masked_fill(~kept, float("-inf")), -1, keepdim=True)).gather(-1, y)[..., 0]
    in_top_k = (proxies[0].indices.long() == batch.labels[..., None]).any(-1)
    assert int((label_kept & ~in_top_k).sum()) > 0  # kept labels outside the top-k (k = 1) exist
    got = proxies[0].label_logq
    assert got is not None and bool((torch.isfinite(got) == label_kept)[valid].all())
    # fp32 log-softmax over 101 logits of size ~1 against float64: a few fp32 ulps of ~5
    torch.testing.assert_close(got[label_kept].double(), exact[label_kept], atol=1e-5, rtol=0)
