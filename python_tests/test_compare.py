"""``unlearn_fast.compare`` / ``unlearn-fast compare`` (issue 6 item 8) on digits with the small CNN and a
2-class forget request: the table, metrics.json, figures, failures, resume, and the H-Mean of EC App. B.6."""
import json
import math

import pytest
import torch

import unlearn_fast
from unlearn_fast.cli import main
from unlearn_fast.evaluation.unlearn_eval import evaluate_unlearned, h_mean, hmean_scores

FAST = dict(model="small_cnn", data="digits", forget="1,3", device="cpu", progress=False,
            original_hparams={"max_epochs": 4, "fit_to_data": False}, tsne_neighbors=3, tsne_max_per_class=12)
METHODS = ["ft", "ga"]
HP = {"ft": {"epochs": 2}, "ga": {"epochs": 2, "lr": 0.01}}
KEYS = ("FA", "RA", "TFA", "TRA", "CKA", "JS", "ZRF", "H-Mean", "time_s", "cka_layers", "cka_retrain_layers",
        "hmean_scores", "cka_layer")


@pytest.fixture(scope="module")
def cmp(tmp_path_factory):
    d = tmp_path_factory.mktemp("cmp")
    return unlearn_fast.compare(methods=METHODS, run_dir=d, hparams=HP, **FAST)


def test_metrics_json_rows_and_keys(cmp):
    m = json.loads((cmp.run_dir / "metrics.json").read_text())
    assert m["kind"] == "compare" and m["forget"] == [1, 3]
    assert m["order"] == ["original", "retrain", *METHODS]
    for name in ("original", "retrain", "ft", "ga"):
        row = m["rows"][name]
        assert row["status"] == "ok", row.get("error")
        for k in KEYS:
            assert k in row, (name, k)
        for k in ("FA", "RA", "TFA", "TRA", "CKA"):
            assert 0 <= row[k] <= 100 + 1e-6, (name, k, row[k])
        assert 0 <= row["JS"] <= math.log(2) and 0 <= row["ZRF"] <= 1
        assert list(row["cka_layers"]) == ["block1", "block2", "block3", "pool", "fc"] and row["cka_layer"] == "pool"
        # the row's H-Mean is EC Eq. 4 over exactly its five normalised scores
        s = row["hmean_scores"]
        assert sorted(s) == ["CKA", "FA", "RA", "TFA", "TRA"]
        assert s["FA"] == pytest.approx(100 - row["FA"]) and s["TRA"] == pytest.approx(row["TRA"])
        assert row["H-Mean"] == pytest.approx(h_mean(list(s.values())))
    o, r = m["rows"]["original"], m["rows"]["retrain"]
    assert o["CKA"] == pytest.approx(100, abs=1e-6) and o["H-Mean"] == pytest.approx(0, abs=1e-6)  # s_CKA = 0 for the original itself
    assert r["JS"] == pytest.approx(0, abs=1e-6) and r["CKA_retrain"] == pytest.approx(100, abs=1e-6)
    assert r["FA"] == 0 and r["TFA"] == 0 and o["TFA"] > 50  # never trained on the forget classes
    assert m["rows"]["ft"]["time_s"] > 0 and m["rows"]["ga"]["time_s"] > 0
    assert m["rows"]["ga"]["TFA"] < o["TFA"]


def test_unknown_method_is_refused_before_any_work(tmp_path):
    """A bad method name is one clear error before anything is trained or written."""
    with pytest.raises(ValueError, match="unknown method 'no_such_method'"):
        unlearn_fast.compare(methods=["ft", "no_such_method"], run_dir=tmp_path / "bad", hparams={"ft": HP["ft"]},
                             **FAST)
    assert not (tmp_path / "bad" / "original.safetensors").exists()


def test_report_table_and_figures(cmp):
    rep = (cmp.run_dir / "report.md").read_text()
    assert "| Method | FA↓ | RA↑ | TFA↓ | TRA↑ | CKA↓ | JS↓ | ZRF | H-Mean↑ | Time (s) |" in rep
    for label in ("| Original |", "| Retrained |", "| ft |", "| ga |"):
        assert label in rep, label
    ga = cmp.metrics["rows"]["ga"]
    assert f"| ga | {ga['FA']:.2f} | {ga['RA']:.2f} |" in rep
    for key in ("cka_layers", "tsne"):
        p = cmp.run_dir / cmp.figures[key]
        assert p.exists() and p.stat().st_size > 5000, key
        assert cmp.figures[key] in rep
    assert cmp.metrics["tsne"]["method"] in ("ft", "ga") and len(cmp.metrics["tsne"]["retain_classes"]) == 3


def test_rerun_skips_finished_methods_and_cli(cmp, capsys, monkeypatch):
    from unlearn_fast.models.io import read_metadata

    before = json.loads((cmp.run_dir / "metrics.json").read_text())
    files = {n: cmp.run_dir / f"{n}.safetensors" for n in ("original", "ft", "ga")}
    stamps = {n: p.stat().st_mtime_ns for n, p in files.items()}
    rc = main(["compare", "--run-dir", str(cmp.run_dir), "--methods", "ft,ga", "--forget", "1,3", "--device", "cpu",
               "--quiet", "--set", "ft.epochs=2", "--set", "ga.epochs=2", "--set", "ga.lr=0.01",
               "--original-set", "max_epochs=4", "--original-set", "fit_to_data=false"])
    assert rc in (0, 1)  # 1: a verdict failed (tiny schedules); never a re-run
    assert {n: p.stat().st_mtime_ns for n, p in files.items()} == stamps  # all finished: nothing re-ran
    out = capsys.readouterr().out
    assert "| ft |" in out and "report:" in out
    after = json.loads((cmp.run_dir / "metrics.json").read_text())
    assert after["rows"]["ga"] == before["rows"]["ga"]
    # another forget request in the same run dir is refused with a clear message
    with pytest.raises(ValueError, match="one forget request"):
        unlearn_fast.compare(methods=["ft"], run_dir=cmp.run_dir, **{**FAST, "forget": "2"})
    # changed hyper-parameters of a finished method: it is computed again, and its record says so
    old_digest = read_metadata(files["ga"])["digest"]
    res = unlearn_fast.compare(methods=["ga"], run_dir=cmp.run_dir, hparams={"ga": {"epochs": 3, "lr": 0.01, "fit_to_data": False}},
                               figures=False, **FAST)
    assert "made with other settings" in capsys.readouterr().err
    row = res.metrics["rows"]["ga"]
    assert row["status"] == "ok" and row["hparams"]["epochs"] == 3
    meta = read_metadata(files["ga"])
    assert meta["hparams"]["epochs"] == 3 and meta["digest"] != old_digest
    assert files["original"].stat().st_mtime_ns == stamps["original"]


def test_hmean_numeric():
    s = hmean_scores(FA=10, RA=90, TFA=20, TRA=80, CKA=60)
    assert s == {"FA": 90, "TFA": 80, "CKA": 40, "RA": 90, "TRA": 80}
    assert h_mean(list(s.values())) == pytest.approx(5 / (2 / 90 + 2 / 80 + 1 / 40))  # 69.2307...
    assert h_mean(list(s.values())) == pytest.approx(69.23076923)
    full = hmean_scores(FA=0, RA=100, TFA=0, TRA=100, CKA=0, knn_gaps=[-3.0, 5.0], IDI=0.95)
    assert full["kNN0"] == 97 and full["kNN1"] == 95 and full["IDI"] == pytest.approx(10.0)  # clip(0.05) -> 0.1
    assert hmean_scores(IDI=-0.2)["IDI"] == pytest.approx(80.0)
    assert h_mean([50, 0, 90]) == 0.0 and math.isnan(h_mean([]))


def test_evaluate_unlearned_against_references():
    """Three different models (unlearned, original, retrained): every number against an independent
    float64 reference on the test forget samples - never a model compared with itself."""
    import numpy as np

    from unlearn_fast.data import load
    from unlearn_fast.models import create
    from unlearn_fast.reference.cka import linear_cka_ref
    from unlearn_fast.reference.divergence import js_divergence_ref

    data = load("digits")
    forget = [0, 9]
    nets = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        nets.append(create("small_cnn", num_classes=10, in_chans=1, img_size=8).eval())
    m, o, rt = nets
    r = evaluate_unlearned(m, o, data, forget, retrained=rt)

    xs, ys = zip(*[data.test[i] for i in range(len(data.test))])
    x, y = torch.stack(xs), torch.as_tensor(ys)
    f = torch.isin(y, torch.tensor(forget))

    def pen(net):  # the classifier's input = pooled penultimate feature (float64)
        grab = []
        h = net.fc.register_forward_pre_hook(lambda _m, inp: grab.append(inp[0].double()))
        with torch.no_grad():
            logits = net(x[f])
        h.remove()
        return grab[0], logits.double()

    (pm, lm), (po, _), (_, lr) = pen(m), pen(o), pen(rt)
    assert r["cka_layer"] == "pool"
    assert r["CKA"] == pytest.approx(100 * linear_cka_ref(pm, po), abs=1e-6)
    assert r["CKA_retrain"] == pytest.approx(100 * linear_cka_ref(pm, pen(rt)[0]), abs=1e-6)
    assert r["JS"] == pytest.approx(float(js_divergence_ref(lm, lr).mean()), abs=1e-6)
    with torch.no_grad():
        pred = m(x).argmax(1)
    assert r["TFA"] == pytest.approx(100 * float((pred[f] == y[f]).double().mean()), abs=1e-9)
    assert r["TRA"] == pytest.approx(100 * float((pred[~f] == y[~f]).double().mean()), abs=1e-9)
    assert 0 < r["CKA"] < 100 and r["JS"] > 0  # different models: nothing is trivially 100 or 0
    assert np.isfinite(r["ZRF"]) and r["n"]["test_forget"] == int(f.sum())
    no_ret = evaluate_unlearned(m, o, data, [4])
    assert no_ret["JS"] is None and no_ret["cka_retrain_layers"] is None
    with pytest.raises(ValueError, match="subset of 0..9"):
        evaluate_unlearned(m, o, data, [10])


def test_select_by_scores(cmp):
    """UnlearnHparams.select_by: the validation score that picks the best state during unlearning."""
    from unlearn_fast.runs import plan_run
    from unlearn_fast.methods import create_method
    from unlearn_fast.methods.unlearning import SELECT_BY, UnlearnContext, hmean
    from unlearn_fast.models.io import load_model

    ctx = plan_run("small_cnn", "digits", cmp.run_dir, device="cpu").ctx
    ctx.forget = [1, 3]
    orig = load_model(cmp.run_dir / "original.safetensors")
    u = UnlearnContext(ctx, orig, [1, 3], "ft")
    ga = load_model(cmp.run_dir / "ga.safetensors")
    s = {k: create_method("ft", select_by=k).validation_score(u, ga) for k in SELECT_BY}
    assert s["hmean"] == pytest.approx(hmean([s["forget"], s["retain"]]))
    assert 0 <= s["hmean_cka"] <= 1 and s["hmean_cka"] != pytest.approx(s["hmean"])
    # the original model against itself: CKA = 1, so 1 - CKA = 0 and the H-Mean with CKA is 0
    assert create_method("ft", select_by="hmean_cka").validation_score(u, orig) == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="select_by must be one of"):
        create_method("ft", select_by="nope").run(ctx)
