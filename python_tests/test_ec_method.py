"""EC unlearning (``ec``) and the EC plug-in (``ft+ec``) on digits with the small CNN and a 2-class forget
request: forget accuracy < 20%, retain accuracy within 15 points of the original, the pre-trained
modules saved in the run dir, and an interrupted run (pre-training and unlearning) that resumes from
``state/`` to exactly the uninterrupted result. Plus the loss bookkeeping of Eq. 3 and the ablations."""
import shutil

import pytest
import torch

import unlearn_fast
import unlearn_fast.methods.ec as ec_mod
import unlearn_fast.methods.ec_plugin as plugin_mod
from unlearn_fast.data import load
from unlearn_fast.evaluation.accuracy import predict_logits
from unlearn_fast.methods import create_method, list_methods
from unlearn_fast.methods.ec import ECSettings, OmegaBatches, ec_loss, layer_weights_for
from unlearn_fast.models import create
from unlearn_fast.models.ec_modules import build_ec_modules, ec_forward
from unlearn_fast.models.io import load_model, load_tensors

FORGET = [1, 3]
EC_HP = dict(pretrain_epochs=2, pretrain_batch_size=256, epochs=3, evals_per_epoch=2)


class Boom(RuntimeError):
    pass


@pytest.fixture(scope="module")
def original_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("ec_orig")
    unlearn_fast.train(method="original", model="small_cnn", data="digits", run_dir=d, device="cpu",
                       progress=False, max_epochs=8, patience=100)
    return d


@pytest.fixture(scope="module")
def digits():
    return load("digits")


def _acc(model, data):
    lg, y = predict_logits(model, data.test, "cpu")
    f = torch.isin(y, torch.tensor(FORGET))
    pred = lg.argmax(1)
    return float((pred[f] == y[f]).float().mean()), float((pred[~f] == y[~f]).float().mean())


def _copy(src, dst):
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "state", ignore_errors=True)
    return dst


def _train(method, d, **hp):
    return unlearn_fast.train(method=method, model="small_cnn", data="digits", run_dir=d, device="cpu",
                              progress=False, forget=FORGET, **hp)


def _raise_at(monkeypatch, module, attr, n):
    real = getattr(module, attr)
    calls = {"n": 0}

    def wrapped(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise Boom(f"simulated crash at call {n}")
        return real(*a, **k)

    monkeypatch.setattr(module, attr, wrapped)


def _assert_same_file(a, b):
    ta, _ = load_tensors(a)
    tb, _ = load_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_ec_forgets_keeps_utility_and_resumes(original_run, digits, tmp_path, monkeypatch):
    full = _copy(original_run, tmp_path / "full")
    fa0, ra0 = _acc(load_model(full / "original.safetensors"), digits)
    assert fa0 > 0.5
    _train("ec", full, **EC_HP)
    mods = list(full.glob("ec_modules*.safetensors"))
    assert len(mods) == 1, "the pre-trained EC modules are saved in the run dir"
    fa, ra = _acc(load_model(full / "ec.safetensors"), digits)
    assert fa < 0.2 and ra > ra0 - 0.15, (fa0, ra0, fa, ra)

    killed = _copy(original_run, tmp_path / "killed")
    # crash in the middle of the 2nd pre-training epoch (5 batches of 256 per epoch, one SupCon call per
    # branch and batch: 2 branches on small_cnn -> 10 calls per epoch) ...
    with monkeypatch.context() as mp:
        _raise_at(mp, ec_mod, "supcon_loss", 10 + 5)
        with pytest.raises(Boom):
            _train("ec", killed, **EC_HP)
    assert not list(killed.glob("ec_modules*.safetensors"))
    (pre,) = (killed / "state").glob("ec_modules*.pretrain.pt")
    loop = torch.load(pre, weights_only=False)["loop"]
    assert loop["steps"] == 5 and not loop["done"]  # checkpoint at the end of epoch 1
    # ... then during unlearning (after the first evaluation point's checkpoint)
    with monkeypatch.context() as mp:
        _raise_at(mp, ec_mod.EraseAtTheCore, "step_loss", 7)
        with pytest.raises(Boom):
            _train("ec", killed, **EC_HP)
    loop = torch.load(killed / "state" / "ec.ec.pt", weights_only=False)["loop"]
    assert loop["steps"] > 0 and not loop["done"] and not (killed / "ec.safetensors").exists()
    _assert_same_file(mods[0], killed / mods[0].name)
    _train("ec", killed, **EC_HP)
    _assert_same_file(full / "ec.safetensors", killed / "ec.safetensors")


def test_ft_plus_ec_forgets_and_resumes(original_run, digits, tmp_path, monkeypatch):
    assert {"ft+ec", "ec"} <= set(list_methods())
    hp = dict(ec_pretrain_epochs=2, ec_pretrain_batch_size=256, epochs=2, evals_per_epoch=2)
    full = _copy(original_run, tmp_path / "full")
    _, ra0 = _acc(load_model(full / "original.safetensors"), digits)
    _train("ft+ec", full, **hp)
    fa, ra = _acc(load_model(full / "ft+ec.safetensors"), digits)
    assert fa < 0.2 and ra > ra0 - 0.15, (ra0, fa, ra)

    killed = _copy(original_run, tmp_path / "killed")
    for f in full.glob("ec_modules*.safetensors"):  # share the pre-trained modules
        shutil.copy(f, killed / f.name)
    with monkeypatch.context() as mp:
        _raise_at(mp, plugin_mod, "ec_loss", 9)
        with pytest.raises(Boom):
            _train("ft+ec", killed, **hp)
    _train("ft+ec", killed, **hp)
    _assert_same_file(full / "ft+ec.safetensors", killed / "ft+ec.safetensors")


def test_plugin_adds_ec_terms_and_hparams():
    m = create_method("ft+ec", ec_tau=0.5, ec_layer_weights=[1, 1, 1], lr=0.1)
    s = m.ec_settings()
    assert s.tau == 0.5 and s.layer_weights == (1.0, 1.0, 1.0) and m.hp.lr == 0.1
    with pytest.raises(ValueError, match="unknown hyper-parameter"):
        create_method("ft+ec", tau=0.5)  # EC knobs are prefixed: no clash with the base's own
    with pytest.raises(ValueError, match="not an UnlearningMethod"):
        plugin_mod.ec_plugin("original", register=False)
    for base in ("duck", "cola"):
        if base in list_methods():
            assert f"{base}+ec" in list_methods()
    cls = plugin_mod.ec_plugin("ft", register=False)
    assert issubclass(cls, plugin_mod.ECPlugin) and cls.name == "ft+ec"


def test_ec_loss_is_eq3_and_ablations():
    torch.manual_seed(0)
    model = create("small_cnn", num_classes=4, in_chans=1, img_size=8)
    ec = build_ec_modules(model)
    s = ECSettings()
    w = layer_weights_for(s, ec)
    assert w == [0.4, 0.8, 1.0]  # small_cnn: L = 3, aligned to the deepest points
    x, yr = torch.randn(5, 1, 8, 8), torch.tensor([0, 2, 3])
    out = ec_forward(model, ec, x)
    parts = {}
    total = ec_loss(out, 2, yr, w, s, parts)
    manual = 0.0
    for z, lg, wl in zip(out.embeddings, out.layer_logits, w):
        cu = -(z[:2] @ z[2:].t()).mean() / s.tau
        ce = torch.nn.functional.cross_entropy(lg[2:], yr)
        manual = manual + wl * (1.5 * cu + 1.5 * ce)
    torch.testing.assert_close(total, manual)
    no_ce = ec_loss(out, 2, yr, w, ECSettings(layer_ce=False))
    ce_last = torch.nn.functional.cross_entropy(out.layer_logits[-1][2:], yr)
    cu_only = sum(wl * 1.5 * (-(z[:2] @ z[2:].t()).mean() / s.tau) for z, wl in zip(out.embeddings, w))
    torch.testing.assert_close(no_ce, cu_only + w[-1] * 1.5 * ce_last)
    with pytest.raises(ValueError, match="retain"):
        ec_loss(out, 5, None, w, s)
    r18 = create("resnet18", num_classes=4, in_chans=1, img_size=16)
    ex = build_ec_modules(r18, extra_points=1)
    assert layer_weights_for(s, ex) == [0.2, 0.4, 0.8, 1.0, 1.0]


def test_omega_batches_pair_each_forget_batch_with_omega_retain_batches(digits):
    f = digits.subset("train", classes=FORGET)
    r = digits.subset("train", exclude=FORGET)
    ob = OmegaBatches(f, r, 64, 32, omega=2, seed=3)
    batches = list(ob(0))
    assert len(batches) == len(ob) == 2 * -(-len(f) // 64)
    assert torch.equal(batches[0]["forget"][0], batches[1]["forget"][0])
    assert not torch.equal(batches[0]["retain"][0], batches[1]["retain"][0])
    assert all(b["retain"][0].shape[0] == 32 for b in batches)
    assert sum(b["forget"][0].shape[0] for b in batches[::2]) == len(f)
    resumed = list(ob(0, start=3))
    assert all(torch.equal(a["retain"][0], b["retain"][0]) for a, b in zip(batches[3:], resumed))


def test_no_modules_ablation_runs(original_run, digits, tmp_path):
    d = _copy(original_run, tmp_path / "nomod")
    _train("ec", d, use_modules=False, epochs=1, evals_per_epoch=1)
    assert not list(d.glob("ec_modules*.safetensors")), "nothing to pre-train without modules"
    fa, _ = _acc(load_model(d / "ec.safetensors"), digits)
    assert fa < 0.5


def test_swin_default_has_no_layer_wise_ce():
    """EC App. A.3: Swin-Tiny runs EC without layer-wise CE; other backbones keep it; explicit wins."""
    assert ECSettings().layer_ce is None
    assert ECSettings().for_model("swin_tiny").layer_ce is False
    assert ECSettings().for_model("resnet50").layer_ce is True
    assert ECSettings(layer_ce=True).for_model("swin_tiny").layer_ce is True
    assert create_method("ec").settings().for_model("swin_tiny").layer_ce is False
    assert create_method("ft+ec").ec_settings().for_model("small_cnn").layer_ce is True
