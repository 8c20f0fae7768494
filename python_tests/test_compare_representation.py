"""``compare`` with the representation metrics (issue 9): WF-Net as a row beside the baselines (its gate
rows baked into a plain model), IDI / probe / k-NN / MIA per row, per-class FA / TFA / JS / Act-Dist,
the H-Mean over every computed EC score with its list, the report sections and EC Fig. 4."""
import json

import pytest
import torch

import unlearn_fast
from unlearn_fast.evaluation.compare_report import not_forgotten, per_class_table_markdown
from unlearn_fast.evaluation.unlearn_eval import h_mean, hmean_scores

FAST = dict(model="small_cnn", data="digits", forget="1,3", device="cpu", progress=False,
            original_hparams={"max_epochs": 4, "min_steps": 20}, tsne_neighbors=3, tsne_max_per_class=12, max_per_class=70)
HP = {"wf": {"batch_size": 64, "grad_accum": 1, "max_epochs": 3, "patience": None}, "ga": {"epochs": 1, "lr": 0.01, "min_steps": 5}}
REP = {"idi": {"preset": "cpu", "epochs": 2, "max_steps": 10}}


@pytest.fixture(scope="module")
def cmp(tmp_path_factory):
    d = tmp_path_factory.mktemp("cmp_rep")
    return unlearn_fast.compare(methods=["wf", "ga"], run_dir=d, hparams=HP, representation="all", knn_data="digits",
                                representation_options=REP, **FAST)


def test_hmean_over_ecs_nine_scores():
    s = hmean_scores(FA=1.0, RA=80.0, TFA=2.0, TRA=75.0, CKA=40.0, knn_gaps={"office": 1.5, "cub": -4.0, "domainnet": 2.0},
                     IDI=-0.05)
    assert list(s) == ["FA", "RA", "TFA", "TRA", "kNN:office", "kNN:cub", "kNN:domainnet", "CKA", "IDI"]
    assert s["kNN:cub"] == 96.0 and s["IDI"] == pytest.approx(95.0)
    assert hmean_scores(IDI=1.5)["IDI"] == pytest.approx(10.0)  # clip(1 - |IDI|, 0.1, 1)
    want = 9 / sum(1 / v for v in (99, 80, 98, 75, 98.5, 96, 98, 60, 95))
    assert h_mean(list(s.values())) == pytest.approx(want)
    assert list(hmean_scores(FA=1, RA=2, TFA=3, TRA=4, CKA=5, knn_gaps=None, IDI=None)) == ["FA", "RA", "TFA", "TRA", "CKA"]


def test_rows_have_representation_metrics_and_hmean_list(cmp):
    m = json.loads((cmp.run_dir / "metrics.json").read_text())
    assert m["order"] == ["original", "retrain", "wf", "ga"]
    for name in m["order"]:
        r = m["rows"][name]
        assert r["status"] == "ok", (name, r.get("error"))
        for k in ("IDI", "IDI_abs", "probe_TFA", "probe_TRA", "MIA", "MIA_member", "knn_forget_retrieval",
                  "knn_overlap_original", "knn", "knn_gap", "ActDist", "per_class", "hmean_of"):
            assert k in r, (name, k)
        assert r["hmean_of"] == ["FA", "RA", "TFA", "TRA", "kNN:digits", "CKA", "IDI"]
        assert r["H-Mean"] == pytest.approx(h_mean([r["hmean_scores"][k] for k in r["hmean_of"]]))
        assert 0 <= r["probe_TFA"] <= 100 and 0 <= r["MIA"] <= 100 and 0 <= r["knn"]["digits"] <= 100
        assert sorted(r["per_class"]["TFA"]) == ["1", "3"] and sorted(r["per_class"]["JS"]) == ["1", "3"]
        # the per-class test accuracies weighted by their counts give the row's TFA
        n = r["per_class"]["n_test"]
        tfa = sum(r["per_class"]["TFA"][c] * n[c] for c in n) / sum(n.values())
        assert tfa == pytest.approx(r["TFA"])
    o, rt = m["rows"]["original"], m["rows"]["retrain"]
    assert o["IDI"] == pytest.approx(1.0) and rt["IDI"] == pytest.approx(0.0)
    assert rt["knn_gap"]["digits"] == 0 and rt["JS"] == pytest.approx(0, abs=1e-6) and rt["ActDist"] == pytest.approx(0, abs=1e-6)
    assert o["knn_overlap_original"] == 100.0 and o["knn_forget_retrieval"] > 80
    assert rt["MIA"] > o["MIA"]  # the retrained model never saw D_f: predicted non-member
    assert o["probe_TFA"] > 80


def test_wf_row_is_the_baked_gate_model(cmp):
    from unlearn_fast.models.io import load_model
    from unlearn_fast.nn import compose, load_wf

    wf = load_wf(cmp.run_dir / "wf.safetensors", cmp.run_dir / "original.safetensors")
    plain = compose(wf, [1, 3])
    from unlearn_fast.evaluation.unlearn_eval import forget_accuracies

    data = unlearn_fast.data.load("digits", max_per_class=70)
    tfa, tra = forget_accuracies(plain, data.test, [1, 3], "cpu")
    row = cmp.metrics["rows"]["wf"]
    assert row["TFA"] == pytest.approx(tfa) and row["TRA"] == pytest.approx(tra)
    orig = load_model(cmp.run_dir / "original.safetensors")
    assert row["CKA"] < 100 - 1e-6 or not torch.equal(plain.fc.weight, orig.fc.weight)


def test_report_sections_and_knn_figure(cmp):
    rep = (cmp.run_dir / "report.md").read_text()
    assert "| Time (s) | H-Mean over |" in rep and "7: FA, RA, TFA, TRA, kNN:digits, CKA, IDI" in rep
    assert "## Inside the network" in rep and "| wf |" in rep and "kNN digits↑ (gap↓)" in rep
    assert "## Per forget class" in rep and "the cheap CPU setting" in rep
    p = cmp.run_dir / cmp.figures["knn"]
    assert p.exists() and p.stat().st_size > 3000 and cmp.figures["knn"] in rep


def test_not_forgotten_flags_a_kept_class():
    metrics = {"forget": [2, 5], "order": ["original", "retrain", "m"],
               "rows": {"original": {"status": "ok", "per_class": {"TFA": {"2": 90.0, "5": 80.0}}},
                        "retrain": {"status": "ok", "per_class": {"TFA": {"2": 0.0, "5": 0.0}}},
                        "m": {"status": "ok", "per_class": {"TFA": {"2": 3.0, "5": 79.0}, "FA": {"2": 1.0, "5": 81.0}}},
                        "n": {"status": "ok", "per_class": {"TFA": {"2": 40.0, "5": 5.0}}}}}
    metrics["order"].append("n")
    # the health verdict's thresholds: >= 90% of the original's TFA fails, above 5% warns, 5% passes
    assert not_forgotten(metrics) == [("m", 5, 79.0, 80.0, "not forgotten"), ("n", 2, 40.0, 90.0, "partly forgotten")]
    table = per_class_table_markdown(metrics, [str(i) for i in range(10)])
    assert "79.00 ⚠" in table and "40.00 ◐" in table
    assert "3.00 ⚠" not in table and "3.00 ◐" not in table and "5.00 ◐" not in table


def test_bad_options_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match="unknown"):
        unlearn_fast.compare(methods=["ga"], run_dir=tmp_path / "a", representation="idi,cka", **FAST)
    with pytest.raises(ValueError, match="cannot load the downstream dataset"):
        unlearn_fast.compare(methods=["ga"], run_dir=tmp_path / "b", knn_data="folder:/no/such", **FAST)
    with pytest.raises(ValueError, match="out-of-distribution surrogate"):  # a method's own input check, before work
        unlearn_fast.compare(methods=["ga", "scar"], run_dir=tmp_path / "c", **FAST)
    with pytest.raises(ValueError, match="run's own dataset"):
        unlearn_fast.compare(methods=["scar"], run_dir=tmp_path / "d", hparams={"scar": {"surrogate": "digits"}}, **FAST)
    for d in "abcd":
        assert not (tmp_path / d / "original.safetensors").exists() and not (tmp_path / d / "ga.safetensors").exists()


def test_wf_representation_per_class(cmp):
    """`evaluate` of a WF run: each gate row baked and measured like a method (probe + MIA here)."""
    from unlearn_fast.evaluation.representation import (RepresentationOptions, representation_metrics,
                                                         wf_representation_per_class)
    from unlearn_fast.models.io import load_model
    from unlearn_fast.nn import bake, load_wf

    data = unlearn_fast.data.load("digits", max_per_class=70)
    orig = load_model(cmp.run_dir / "original.safetensors")
    wf = load_wf(cmp.run_dir / "wf.safetensors", orig)
    opts = RepresentationOptions.make("probe,mia,idi")
    per = wf_representation_per_class(wf, orig, {}, data, [3, 5], opts, device="cpu")
    assert sorted(per) == [3, 5] and per[5]["IDI"] is None and "IDI needs the retrained model" in per[5]["notes"]
    want = representation_metrics(bake(wf, 5), orig, None, data, [5], opts, device="cpu")
    assert per[5]["probe_TFA"] == want["probe_TFA"] and per[5]["MIA"] == want["MIA"]
