"""Membership inference (card 12): attack features against float64 formulas, the card's sanity value,
a memorising model (attack clearly above chance) vs identically distributed sets (about chance), the
scalable attacks against sklearn's SVC, and the SVC-MIA convention on digits models."""
import math

import pytest
import torch
from torch import nn

from unlearn_fast.evaluation.mia import fit_attack, membership_attack_accuracy, mia_efficacy, mia_features, svc_mia


@pytest.fixture(scope="module")
def digits_models():
    from repr_helpers import digits_models as make

    return make()


def test_features_match_float64_formulas():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(13, 5, generator=g) * 4
    y = torch.randint(0, 5, (13,), generator=g)
    p = torch.softmax(logits.double(), 1)
    for i in range(13):
        pi, yi = p[i], int(y[i])
        ent = -sum(float(q) * math.log(float(q)) for q in pi)
        ment = -(1 - float(pi[yi])) * math.log(float(pi[yi])) - sum(
            float(pi[j]) * math.log(1 - float(pi[j])) for j in range(5) if j != yi)
        want = {"confidence": float(pi[yi]), "entropy": ent, "m_entropy": ment, "loss": -math.log(float(pi[yi]))}
        for k, v in want.items():
            assert float(mia_features(logits, y, k)[i, 0]) == pytest.approx(v, rel=1e-10, abs=1e-12), k
    assert mia_features(logits, y, "prob").shape == (13, 5)
    with pytest.raises(ValueError, match="unknown"):
        mia_features(logits, y, "conf")


@pytest.mark.parametrize("attack", ["svc", "rff", "threshold"])
def test_card_sanity_value(attack):
    # shadow confidence: members 1, non-members 0; forget confidence 0 -> efficacy 100 %
    ones, zeros = torch.ones(20, 1), torch.zeros(20, 1)
    assert mia_efficacy(ones, zeros, torch.zeros(7, 1), attack) == 100.0
    assert mia_efficacy(ones, zeros, torch.ones(7, 1), attack) == 0.0


def _memoriser():
    """A 2-layer MLP that memorises 120 random-label points (train confidence ~1, fresh points lower)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(120, 10, generator=g), torch.randint(0, 4, (120,), generator=g)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(10, 128), nn.ReLU(), nn.Linear(128, 4))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(300):
        loss = nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    xo, yo = torch.randn(120, 10, generator=g), torch.randint(0, 4, (120,), generator=g)
    with torch.no_grad():
        return m(x), y, m(xo), yo


@pytest.mark.parametrize("attack", ["svc", "rff", "threshold"])
def test_memorised_model_is_exposed_and_iid_is_chance(attack):
    lm, ym, lo, yo = _memoriser()
    acc = membership_attack_accuracy(mia_features(lm, ym), mia_features(lo, yo), attack)
    assert acc > 0.8, acc
    # identically distributed "members" and "non-members" (both fresh samples): about 0.5
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(600, 1, generator=g), torch.rand(600, 1, generator=g)
    chance = membership_attack_accuracy(a, b, attack, seed=2)
    assert abs(chance - 0.5) < 0.07, chance


def test_rff_approximates_the_rbf_kernel():
    from unlearn_fast.evaluation.mia import rff_map

    g = torch.Generator().manual_seed(4)
    x = torch.rand(40, 3, generator=g, dtype=torch.float64)
    gamma = 1 / 3
    phi = rff_map(3, 8192, gamma, seed=1)(x)
    exact = torch.exp(-gamma * torch.cdist(x, x) ** 2)
    assert float((phi @ phi.T - exact).abs().max()) < 0.05


def test_scalable_attacks_agree_with_svc():
    g = torch.Generator().manual_seed(5)
    mem = (0.9 + 0.08 * torch.randn(400, 1, generator=g)).clamp(0, 1)
    non = (0.6 + 0.2 * torch.randn(400, 1, generator=g)).clamp(0, 1)
    target = torch.rand(300, 1, generator=g)
    p_svc = fit_attack(mem, non, "svc").predict(target)
    for att in ("rff", "threshold"):
        agree = float((fit_attack(mem, non, att).predict(target) == p_svc).double().mean())
        assert agree > 0.93, (att, agree)
    with pytest.raises(ValueError, match="svc_max"):
        fit_attack(mem, non, "svc", svc_max=100)
    assert fit_attack(mem, non, "auto", svc_max=100).name == "rff"


def test_svc_mia_convention_on_digits(digits_models):
    data, original, retrained, headonly = digits_models
    r = svc_mia(retrained, data, [1, 3], device="cpu")
    o = svc_mia(original, data, [1, 3], device="cpu")
    h = svc_mia(headonly, data, [1, 3], device="cpu", attack="rff")
    assert r["mia_attack"] == "svc" and r["MIA"] + r["MIA_member"] == pytest.approx(100)
    # retrained: D_f looks unseen (low confidence) -> predicted non-member; original: D_f looks like a member
    assert r["MIA"] > 90 and o["MIA"] < 40, (r, o)
    # logit-level MIA is fooled by a head-only forgetting (its D_f confidence is ~0): why card 12 adds the probe
    assert h["MIA"] > 90 and h["mia_attack"] == "rff"
    assert r["n_shadow"] == min(int((~torch.isin(data.targets["train"], torch.tensor([1, 3]))).sum()),
                                int((~torch.isin(data.targets["test"], torch.tensor([1, 3]))).sum()))
