"""One loss configuration (`lpreg.LossConfig`), validated once per call, shared by every entry point."""

import dataclasses
import inspect

import pytest
import torch

import lpreg
from lpreg import _loss_terms
from lpreg.loss_config import STATS_OPTIONS
from tests.test_fused_linear import make_selectable
from tests.test_policy_loss import make_batch


class Counter:
    """Counts LossConfig constructions and input preparations."""

    def __init__(self, monkeypatch):
        self.configs = self.prepares = 0
        post_init, prepare = lpreg.LossConfig.__post_init__, _loss_terms.prepare

        def counted_post_init(cfg):
            self.configs += 1
            post_init(cfg)

        def counted_prepare(*a, **k):
            self.prepares += 1
            return prepare(*a, **k)

        monkeypatch.setattr(lpreg.LossConfig, "__post_init__", counted_post_init)
        monkeypatch.setattr(_loss_terms, "prepare", counted_prepare)


def test_lpreg_policy_loss_validates_once(monkeypatch):
    logits, labels, adv, old, mask = make_batch(seed=1)
    count = Counter(monkeypatch)
    lpreg.lpreg_policy_loss(logits, labels, adv, old, mask, compat="paper", rho=0.3, backend="torch")
    assert (count.configs, count.prepares) == (1, 1)


def test_every_entry_point_validates_once(monkeypatch):
    logits, labels, adv, old, mask = make_batch(seed=2)
    stats = lpreg.lpreg_token_stats(logits, labels, backend="torch")
    hidden, weight, bias, lab, adv2, old2, mask2 = make_selectable(seed=2)
    calls = {
        "policy_loss_from_stats": lambda: lpreg.policy_loss_from_stats(stats, adv, old, mask, rho=0.3),
        "fused_linear_policy_loss": lambda: lpreg.fused_linear_policy_loss(hidden, weight, lab, adv2, old2, mask2,
                                                                           bias=bias, rho=0.3, backend="torch"),
    }
    for name, call in calls.items():
        count = Counter(monkeypatch)
        call()
        assert (count.configs, count.prepares) == (1, 1), name


def test_one_keyword_set_defined_once():
    """The entry points expose LossConfig's fields as keywords, with LossConfig's defaults."""
    fields = {f.name: f.default for f in dataclasses.fields(lpreg.LossConfig)}
    for fn, excluded in ((lpreg.lpreg_policy_loss, ()), (lpreg.fused_linear_policy_loss, ()),
                         (lpreg.policy_loss_from_stats, STATS_OPTIONS)):
        params = inspect.signature(fn).parameters
        for name, default in fields.items():
            if name in excluded:
                assert name not in params, (fn.__name__, name)
            else:
                assert params[name].default == default and params[name].kind == inspect.Parameter.KEYWORD_ONLY


def test_unknown_and_inapplicable_options():
    logits, labels, adv, old, mask = make_batch(B=2, L=3, V=16, seed=3)
    with pytest.raises(TypeError, match="rhoo"):
        lpreg.lpreg_policy_loss(logits, labels, adv, old, mask, rhoo=0.1)
    stats = lpreg.lpreg_token_stats(logits, labels, backend="torch")
    # the statistics' options are not in policy_loss_from_stats's signature: Python names the keyword
    for option in STATS_OPTIONS:
        with pytest.raises(TypeError, match=option):
            lpreg.policy_loss_from_stats(stats, adv, old, mask, **{option: 0.7})


@pytest.mark.parametrize("kw,name", [
    (dict(compat="both"), "compat"), (dict(clip_ratio_c=1.0), "clip_ratio_c"),
    (dict(clip_ratio_c=True), "clip_ratio_c"),
    (dict(rho=0.0), "rho"), (dict(beta=float("nan")), "beta"), (dict(kl_estimator="k2"), "kl_estimator"),
    (dict(loss_agg_mode="token-sum"), "loss_agg_mode"), (dict(ignore_index=1.5), "ignore_index"),
    (dict(mode="fixed", threshold=1.0), "threshold"), (dict(backend="gpu"), "backend"),
])
def test_loss_config_names_the_bad_argument(kw, name):
    with pytest.raises(ValueError, match=name):
        lpreg.LossConfig(**kw)


def test_loss_config_normalises_and_fills_the_estimator():
    cfg = lpreg.LossConfig(compat="paper", rho=1, beta=2, clip_ratio_c=3)
    assert cfg.kl_estimator == "full" and isinstance(cfg.rho, float) and cfg.clip_ratio_c == 3.0
    assert lpreg.LossConfig().kl_estimator == "k3"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rho = 0.5


def test_needs_step_selection():
    assert lpreg.needs_step_selection("paper") is True
    assert lpreg.needs_step_selection("released") is False
    with pytest.raises(ValueError, match="compat"):
        lpreg.needs_step_selection("Paper")


def test_fused_token_stats_keep_the_exact_label_logq_of_a_sparse_proxy():
    """A label outside the proxy's top k still gets its exact log q chunk by chunk (label_logq)."""
    hidden, weight, bias, labels, *_ = make_selectable(seed=4)
    logits = hidden @ weight.T + bias
    proxy = lpreg.build_proxy(logits, labels=labels, k=1)  # k = 1: most labels fall outside the top k
    want = lpreg.sparse_proxy_stats(logits, labels, proxy, backend="torch").proxy_logp
    got = lpreg.fused_linear_token_stats(hidden, weight, labels, bias=bias, proxy=proxy, chunk_size=5,
                                         backend="torch").proxy_logp
    assert torch.equal(want, proxy.label_logq)
    outside = labels != proxy.indices[..., 0].long()
    assert outside.sum() > 0 and torch.isfinite(want[outside]).any()
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kw,name", [
    (dict(compat="both"), "compat"), (dict(clip_ratio_c=1.0), "clip_ratio_c"), (dict(rho=0.0), "rho"),
    (dict(rho="x"), "rho"), (dict(beta=float("nan")), "beta"), (dict(clip_low=2.0), "clip_low"),
    (dict(clip_high=-1.0), "clip_high"), (dict(kl_estimator="k2"), "kl_estimator"),
    (dict(loss_agg_mode="token-sum"), "loss_agg_mode"), (dict(ignore_index=1.5), "ignore_index"),
    (dict(temperature=0.0), "temperature"), (dict(mode="top_p"), "mode"),
    (dict(mode="fixed", threshold=1.0), "threshold"), (dict(backend="gpu"), "backend"),
])
def test_loss_config_error_carries_the_field(kw, name):
    """A structured field name (issue 23): adapters map `.field`, they do not parse the message."""
    with pytest.raises(lpreg.LossConfigError) as info:
        lpreg.LossConfig(**kw)
    assert isinstance(info.value, ValueError) and info.value.field == name
    assert str(info.value).startswith(name + " "), str(info.value)


def test_regularize_takes_the_options_that_apply():
    """lpreg_regularize's options are the selection's and the penalty's; the base objective (clips,
    aggregation) and the statistics (temperature, filter, transform) are the caller's."""
    fields = {f.name: f.default for f in dataclasses.fields(lpreg.LossConfig)}
    params = inspect.signature(lpreg.lpreg_regularize).parameters
    own = {"compat", "rho", "beta", "kl_estimator"}
    for name in own:
        assert params[name].default == fields[name] and params[name].kind == inspect.Parameter.KEYWORD_ONLY
    assert not (set(fields) - own) & set(params)


@pytest.mark.parametrize("kw,name", [(dict(logit_scale=0.0), "logit_scale"), (dict(logit_scale=float("inf")),
                                      "logit_scale"), (dict(logit_scale="x"), "logit_scale"),
                                     (dict(logit_softcap=0.0), "logit_softcap"),
                                     (dict(logit_softcap=float("nan")), "logit_softcap"),
                                     (dict(logit_softcap=True), "logit_softcap")])
def test_logit_transform_options_are_checked(kw, name):
    with pytest.raises(lpreg.LossConfigError) as info:
        lpreg.LossConfig(**kw)
    assert info.value.field == name and str(info.value).startswith(name + " ")
    cfg = lpreg.LossConfig(logit_scale=2, logit_softcap=30)
    assert (cfg.logit_scale, cfg.logit_softcap) == (2.0, 30.0) and isinstance(cfg.logit_scale, float)


ADAPTER = dict(lpreg_compat="released", lpreg_mode="min_p", lpreg_threshold=0.02, lpreg_rho=0.01, lpreg_beta=1.0,
               lpreg_kl_estimator=None)


@pytest.mark.parametrize("field,value", [("rho", 0.0), ("mode", "top_p"), ("threshold", 2.0), ("compat", "x"),
                                         ("kl_estimator", "k2"), ("beta", -1.0)])
def test_adapters_map_the_field_to_their_option(field, value):
    from lpreg.integrations._core import loss_config

    with pytest.raises(lpreg.LossConfigError) as info:
        loss_config({**ADAPTER, f"lpreg_{field}": value})
    assert info.value.field == f"lpreg_{field}" and str(info.value).startswith(f"lpreg_{field} ")


def test_adapters_read_the_field_not_the_message(monkeypatch):
    """A message that does not start with the field's name still maps by `.field`."""
    import lpreg.integrations._core as core

    def bad(**kw):
        raise lpreg.LossConfigError("beta", "the penalty weight is negative")

    monkeypatch.setattr(core, "LossConfig", bad)
    with pytest.raises(lpreg.LossConfigError) as info:
        core.loss_config(ADAPTER)
    assert info.value.field == "lpreg_beta" and str(info.value).startswith("lpreg_beta")
