"""IDI (methods card 1, EC App. B.6): the InfoNCE estimate against the literal N x N float64 formula, the
card's sanity values, a known-answer case (features that carry the forget label vs features that do
not), the frozen prefix, the layer choice and the IDI(original) = 1 / IDI(retrained) = 0 identities."""
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from unlearn_fast.evaluation.idi import (compute_idi, idi_config, idi_from_mi, idi_layers, infonce_binary,
                                         layer_mutual_information)
from unlearn_fast.reference.idi import idi_reference, infonce_mi_reference

FAST = dict(batch_size=128, epochs=6, max_steps=40, dim=16, lr_suffix=3e-3, lr_head=1e-2)


@pytest.mark.parametrize("n,shift", [(7, 0.0), (33, 3.0), (250, -2.0)])
def test_infonce_binary_matches_nxn_float64(n, shift):
    g = torch.Generator().manual_seed(n)
    scores = torch.randn(n, 2, generator=g) * 3 + shift
    y = (torch.rand(n, generator=g) < 0.3).long()
    y[0], y[1] = 0, 1
    got = float(infonce_binary(scores.float(), y))
    assert got == pytest.approx(infonce_mi_reference(scores, y), rel=1e-5, abs=1e-6)
    assert float(infonce_binary(scores.double(), y)) == pytest.approx(infonce_mi_reference(scores, y), rel=1e-12, abs=1e-12)


def test_infonce_saturates_at_label_entropy():
    # card 1 sanity: perfectly separable, balanced -> ln 2; p_f = 0.1 -> 0.3251; one label only -> 0
    for p, want in ((0.5, math.log(2)), (0.1, 0.3251)):
        n = 1000
        y = (torch.arange(n) < int(p * n)).long()
        scores = torch.stack([torch.where(y == 0, 50.0, -50.0), torch.where(y == 1, 50.0, -50.0)], 1)
        assert float(infonce_binary(scores, y)) == pytest.approx(want, abs=1e-4)
    assert float(infonce_binary(torch.randn(10, 2), torch.zeros(10, dtype=torch.long))) == pytest.approx(0, abs=1e-6)


def test_idi_normalisation_card_values():
    I_o, I_r, I_u = [.6, .5, .3], [.2, .1, .05], [.3, .05, .05]
    ks = ["a", "b", "c"]
    d = lambda v: dict(zip(ks, v))  # noqa: E731
    res = idi_from_mi(d(I_u), d(I_o), d(I_r))
    assert res["IDI"] == pytest.approx(0.0476, abs=1e-4) == idi_reference(I_u, I_o, I_r)
    assert idi_from_mi(d(I_u), d(I_o), d(I_r), clip=True)["IDI"] == pytest.approx(0.0952, abs=1e-4)
    assert idi_from_mi(d(I_o), d(I_o), d(I_r))["IDI"] == pytest.approx(1.0)
    assert idi_from_mi(d(I_r), d(I_o), d(I_r))["IDI"] == pytest.approx(0.0)
    # signed: an unlearned model with less information than Retrain gets a negative IDI
    assert idi_from_mi(d([.1, .05, 0]), d(I_o), d(I_r))["IDI"] < 0
    guard = idi_from_mi(d(I_u), d(I_r), d(I_r))
    assert math.isnan(guard["IDI"]) and "undefined" in guard["note"]


def _toy(n, informative, p, seed, d=6):
    g = torch.Generator().manual_seed(seed)
    cls = (torch.rand(n, generator=g) < p).long()  # class 1 is the forget class
    x = torch.randn(n, d, generator=g)
    if informative:
        x[:, 0] += 4.0 * (2 * cls - 1).float()
    return TensorDataset(x, cls)


def _toy_model(d=6):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))


@pytest.mark.parametrize("p", [0.5, 0.2])
def test_known_answer_label_vs_noise(p):
    """Features carrying the label: the estimate reaches H(p); features independent of it: about 0."""
    h = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    cfg = idi_config("cpu", **FAST)
    model = _toy_model()
    kw = dict(layers=["0"], classifier="4", config=cfg, device="cpu")
    inf = layer_mutual_information(model, _toy(600, True, p, 1), _toy(400, True, p, 2), [1], **kw)["0"]
    noise = layer_mutual_information(model, _toy(600, False, p, 1), _toy(400, False, p, 2), [1], **kw)["0"]
    assert inf == pytest.approx(h, abs=0.06 * h + 0.02), (inf, h)
    assert abs(noise) < 0.05 and inf > 5 * max(noise, 0.02), (inf, noise)


def test_prefix_frozen_model_untouched_and_membership_label():
    """Only the layers after Z_l train; the evaluated model itself is never modified; Y = [class in forget]."""
    model = _toy_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = idi_config("cpu", **FAST)
    # classes 0..3, forget {2}: the feature carries "class == 2" only through the class id -> with class
    # ids mapped to membership the informative toy needs the forget class to be the shifted one
    g = torch.Generator().manual_seed(5)
    cls = torch.randint(0, 4, (500,), generator=g)
    x = torch.randn(500, 6, generator=g)
    x[:, 0] += 4.0 * (2 * (cls == 2).long() - 1).float()
    ds = TensorDataset(x, cls)
    mi_2 = layer_mutual_information(model, ds, ds, [2], layers=["2"], classifier="4", config=cfg)["2"]
    mi_0 = layer_mutual_information(model, ds, ds, [0], layers=["2"], classifier="4", config=cfg)["2"]
    p = float((cls == 2).double().mean())
    assert mi_2 > 0.7 * -(p * math.log(p) + (1 - p) * math.log(1 - p)) and mi_0 < 0.5 * mi_2
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_layer_choice_per_backbone():
    from unlearn_fast.models import create

    assert idi_layers(create("small_cnn", num_classes=10, in_chans=1, img_size=8)) == ["block1", "block2", "block3"]
    assert idi_layers(create("resnet50", num_classes=10, in_chans=3, img_size=32)) == ["layer4.0", "layer4.1", "layer4.2"]
    assert idi_layers(create("resnet18", num_classes=10, in_chans=3, img_size=32)) == ["layer3.1", "layer4.0", "layer4.1"]


def test_config_presets_and_errors():
    ec = idi_config("ec")
    assert (ec.batch_size, ec.epochs, ec.max_steps, ec.dim, ec.lr_suffix, ec.lr_head) == (512, 5, 800, 128, 3e-5, 5e-4)
    assert idi_config({"preset": "cpu", "epochs": 2}).epochs == 2
    with pytest.raises(ValueError, match="no fields"):
        idi_config("cpu", epoch=3)
    with pytest.raises(ValueError, match="unknown"):
        idi_config("fast")
    with pytest.raises(ValueError, match="has no modules"):
        layer_mutual_information(_toy_model(), _toy(20, True, .5, 0), _toy(20, True, .5, 1), [1], layers=["9"],
                                 classifier="4", config=idi_config("cpu", **FAST))


def test_compute_idi_identities_and_cache(digits_models):
    data, original, retrained, other = digits_models
    cache = {}
    cfg = idi_config("cpu", **{**FAST, "epochs": 2})
    r_o = compute_idi(original, original, retrained, data, [1, 3], config=cfg, cache=cache)
    assert r_o["IDI"] == pytest.approx(1.0) and r_o["layers"] == ["block1", "block2", "block3"]
    ref = cache["idi_reference"]
    r_r = compute_idi(retrained, original, retrained, data, [1, 3], config=cfg, cache=cache)
    assert r_r["IDI"] == pytest.approx(0.0) and cache["idi_reference"] is ref
    r_u = compute_idi(other, original, retrained, data, [1, 3], config=cfg, cache=cache)
    assert math.isfinite(r_u["IDI"]) and set(r_u["mi"]["unlearned"]) == {"block1", "block2", "block3"}
    assert r_u["IDI"] == pytest.approx(idi_reference(*(list(r_u["mi"][k].values()) for k in ("unlearned", "original", "retrained"))))
    assert 0 < r_u["H_Y"] < math.log(2)


@pytest.fixture(scope="module")
def digits_models():
    from repr_helpers import digits_models as make

    return make()


def test_critic_trains_only_the_suffix():
    """f_nu: the parameters Z_l depends on are frozen, the later blocks train, the classifier is unused."""
    from unlearn_fast.evaluation.idi import _LayerCritic

    model = _toy_model()
    critic = _LayerCritic(model, "2", "4", 8, torch.randn(3, 6))
    suffix = {id(p) for p in critic.suffix}
    named = dict(critic.net.named_parameters())
    assert suffix == set() and all(not p.requires_grad for p in named.values())  # "2" feeds the classifier directly
    critic = _LayerCritic(model, "0", "4", 8, torch.randn(3, 6))
    assert {n for n, p in critic.net.named_parameters() if p.requires_grad} == {"2.weight", "2.bias"}
    assert {id(p) for p in critic.suffix} == {id(named_p) for n, named_p in critic.net.named_parameters() if n.startswith("2.")}
    s = critic(torch.randn(5, 6))
    assert s.shape == (5, 2)
    s.sum().backward()
    assert critic.net[0].weight.grad is None and critic.net[2].weight.grad is not None


def test_small_denominator_is_flagged(digits_models, monkeypatch):
    """|ID(original)| below 10% of H(Y) is within the estimator's noise: the result says so."""
    import unlearn_fast.evaluation.idi as idi

    data, original, retrained, other = digits_models
    fake = {original: {"b": 0.30}, retrained: {"b": 0.29}, other: {"b": 0.33}}
    monkeypatch.setattr(idi, "layer_mutual_information", lambda m, *a, **k: fake[m])
    r = idi.compute_idi(other, original, retrained, data, [1, 3], layers=["b"], config="cpu")
    assert r["IDI"] == pytest.approx(4.0) and "unreliable" in r["note"]
    fake[retrained] = {"b": 0.05}
    r = idi.compute_idi(other, original, retrained, data, [1, 3], layers=["b"], config="cpu")
    assert r["IDI"] == pytest.approx(0.28 / 0.25) and r["note"] == ""
