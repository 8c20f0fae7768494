"""k-NN (EC App. B.6 / A.1, card 12): cosine top-k and the uniform vote against a brute-force float64
NumPy k-NN and sklearn, the seed-2 80/20 split, the card's two-cluster sanity value, forget-class
retrieval on digits models, the downstream spec loader and the EC Fig. 4-like figure."""
import numpy as np
import pytest
import torch

from unlearn_fast.evaluation.knn import (cosine_topk, knn_classify, knn_downstream, knn_retrieval, knn_split_accuracy,
                                         load_knn_data, plot_knn_retrieval, split_indices)


@pytest.fixture(scope="module")
def digits_models():
    from repr_helpers import digits_models as make

    return make()


def _np_knn(train, ty, query, k, n_cls):
    """Brute-force float64 cosine k-NN: (indices [q, k], labels [q]); vote ties -> smallest class."""
    a = train / np.linalg.norm(train, axis=1, keepdims=True)
    b = query / np.linalg.norm(query, axis=1, keepdims=True)
    sim = b @ a.T
    idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    votes = np.zeros((len(query), n_cls), dtype=int)
    for i in range(len(query)):
        for j in idx[i]:
            votes[i, ty[j]] += 1
    return idx, votes.argmax(1)


@pytest.mark.parametrize("n,q,d,k,chunk", [(53, 17, 7, 5, 4), (200, 61, 3, 1, 4096), (30, 9, 129, 30, 2)])
def test_topk_and_vote_match_numpy_float64(n, q, d, k, chunk):
    g = torch.Generator().manual_seed(n + d)
    train, query = torch.randn(n, d, generator=g), torch.randn(q, d, generator=g)
    ty = torch.randint(0, 4, (n,), generator=g)
    sims, idx = cosine_topk(train, query, k, chunk=chunk)
    ref_idx, ref_pred = _np_knn(train.double().numpy(), ty.numpy(), query.double().numpy(), k, 4)
    np.testing.assert_array_equal(idx.numpy(), ref_idx)
    a = torch.nn.functional.normalize(train.double(), dim=1)
    b = torch.nn.functional.normalize(query.double(), dim=1)
    np.testing.assert_allclose(sims.numpy(), (b @ a.T).gather(1, idx).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(knn_classify(train, ty, query, k, 4).numpy(), ref_pred)


def test_vote_matches_sklearn_and_two_clusters():
    from sklearn.neighbors import KNeighborsClassifier

    g = torch.Generator().manual_seed(7)
    train, query = torch.randn(120, 6, generator=g), torch.randn(40, 6, generator=g)
    ty = torch.randint(0, 3, (120,), generator=g)
    sk = KNeighborsClassifier(n_neighbors=5, metric="cosine", algorithm="brute").fit(train.numpy(), ty.numpy())
    np.testing.assert_array_equal(knn_classify(train, ty, query, 5).numpy(), sk.predict(query.numpy()))
    # card 12 sanity: two well-separated clusters -> accuracy 100 %
    y = torch.arange(100) % 2
    f = torch.randn(100, 4, generator=g) * 0.1 + torch.where(y[:, None] == 0, torch.tensor([5.0, 0, 0, 0]), torch.tensor([0, 5.0, 0, 0]))
    assert knn_split_accuracy(f, y) == 100.0
    assert 20 < knn_split_accuracy(torch.randn(400, 8, generator=g), torch.arange(400) % 2) < 80  # label-free: about 50


def test_split_is_random_split_seed_2():
    from torch.utils.data import random_split

    tr, te = split_indices(101)
    a, b = random_split(range(101), [0.8, 0.2], generator=torch.Generator().manual_seed(2))
    assert tr == list(a.indices) and te == list(b.indices) and len(tr) == 81 and sorted(tr + te) == list(range(101))


def test_bad_k_and_spec():
    with pytest.raises(ValueError, match="k = 9"):
        cosine_topk(torch.randn(4, 2), torch.randn(1, 2), 9)
    from unlearn_fast.data import load

    with pytest.raises(ValueError, match="cannot load the downstream dataset"):
        load_knn_data("folder:/no/such/dir", load("digits"))


def test_retrieval_downstream_and_figure(digits_models, tmp_path):
    from unlearn_fast.evaluation.unlearn_eval import penultimate_features

    data, original, retrained, headonly = digits_models
    ds = load_knn_data("digits", data)
    assert len(ds) == 1797
    acc_o = knn_downstream(original, ds, device="cpu")
    assert acc_o > 85
    ftr = {n: penultimate_features(m, data.train, "cpu") for n, m in (("o", original), ("r", retrained), ("h", headonly))}
    q = data.subset("test", classes=[1, 3])
    fq = {n: penultimate_features(m, q, "cpu") for n, m in (("o", original), ("r", retrained), ("h", headonly))}
    ro = knn_retrieval(*ftr["o"], *fq["o"], [1, 3])
    rr = knn_retrieval(*ftr["r"], *fq["r"], [1, 3], reference_idx=ro["neighbors"])
    rh = knn_retrieval(*ftr["h"], *fq["h"], [1, 3], reference_idx=ro["neighbors"])
    # the original retrieves its own forget classes; a head-only forgetting retrieves exactly the same images
    assert ro["knn_forget_retrieval"] > 85 and ro["knn_same_class"] > 85
    assert rh["knn_overlap_original"] == 100.0 and rh["knn_forget_retrieval"] == ro["knn_forget_retrieval"]
    assert rr["knn_overlap_original"] < 60 and rr["neighbors"].shape == (len(q), 5)
    i = 0
    x_q, y_q = q[i]
    nb = {name: [data.train[int(j)] for j in r["neighbors"][i]] for name, r in (("Original", ro), ("Retrained", rr))}
    p = plot_knn_retrieval((x_q, y_q), nb, [1, 3], data.class_names, tmp_path / "knn.png", data.mean, data.std)
    assert p.exists() and p.stat().st_size > 3000
