"""Linear-probe recovery attack (card 12): stratified subset, the L-BFGS head against sklearn's
LogisticRegression optimum, chance on label-free features, and recovery of a head-only forgetting."""
import math

import numpy as np
import pytest
import torch

from unlearn_fast.evaluation.probe import fit_linear_probe, linear_probe, stratified_indices


@pytest.fixture(scope="module")
def digits_models():
    from repr_helpers import digits_models as make

    return make()


def test_stratified_indices_counts_and_seed():
    y = torch.tensor([0] * 7 + [1] * 301 + [2] * 51 + [5] * 2)
    idx = stratified_indices(y, fraction=0.02, min_per_class=5, seed=3)
    counts = torch.bincount(y[idx], minlength=6).tolist()
    assert counts == [5, 7, 5, 0, 0, 2]  # max(5, ceil(.02 n)) capped at n: ceil(6.02) = 7
    assert torch.equal(idx, stratified_indices(y, 0.02, 5, seed=3)) and not torch.equal(idx, stratified_indices(y, 0.02, 5, seed=4))
    assert len(set(idx.tolist())) == len(idx)
    with pytest.raises(ValueError, match="fraction"):
        stratified_indices(y, 0.0)


@pytest.mark.parametrize("n,d,k", [(97, 13, 4), (60, 3, 2)])
def test_probe_is_the_logistic_regression_optimum(n, d, k):
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(n)
    y = torch.randint(0, k, (n,), generator=g)
    x = torch.randn(n, d, generator=g) * 3 + 1 + torch.nn.functional.one_hot(y, k).float() @ torch.randn(k, d, generator=g)
    l2 = 0.05
    probe = fit_linear_probe(x, y, k, l2=l2)
    z = ((x.double() - x.double().mean(0)) / x.double().std(0, unbiased=False)).numpy()
    # sklearn fits K = 2 as one logistic w (= W1 - W0, and the symmetric optimum has ||W||^2 = ||w||^2 / 2)
    C = (2.0 if k == 2 else 1.0) / (n * l2)
    sk = LogisticRegression(C=C, tol=1e-12, max_iter=10000).fit(z, y.numpy())
    xt = torch.randn(31, d, generator=g) * 3
    ours = torch.softmax(probe(xt), 1).numpy()
    ref = sk.predict_proba(((xt.double() - x.double().mean(0)) / x.double().std(0, unbiased=False)).numpy())
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_probe_on_label_free_features_is_at_chance():
    g = torch.Generator().manual_seed(0)
    k = 5
    ytr, yte = torch.arange(250) % k, torch.arange(2000) % k
    probe = fit_linear_probe(torch.randn(250, 16, generator=g), ytr, k)
    acc = float((probe(torch.randn(2000, 16, generator=g)).argmax(1) == yte).double().mean())
    assert abs(acc - 1 / k) < 0.05, acc


def test_probe_recovers_head_only_forgetting(digits_models):
    data, original, retrained, headonly = digits_models
    res = {n: linear_probe(m, data, [1, 3], device="cpu") for n, m in
           (("original", original), ("retrained", retrained), ("headonly", headonly))}
    assert res["original"]["n_probe"] == len(stratified_indices(data.targets["train"], 0.02, 5))
    # all ten classes in the probe subset, >= 5 each
    assert torch.bincount(data.targets["train"][stratified_indices(data.targets["train"])]).min() >= 5
    assert res["original"]["probe_TFA"] > 85, res
    # the head-only model's logits forgot (TFA 0), its features did not: the probe gets the classes back
    assert res["headonly"]["probe_TFA"] == pytest.approx(res["original"]["probe_TFA"])
    assert set(res["original"]["probe_per_class"]) == {1, 3}
    assert 0 <= res["retrained"]["probe_TFA"] <= 100 and res["retrained"]["probe_TRA"] > 80
