"""EC modules (CDS branches) and the contrastive losses: shapes on ResNet-18/50, Swin-T and ViT at 32 and
224 px, a real forward on small models, and SupCon / EC Eq. 1 against the float64 reference."""
import math

import pytest
import torch
import torch.nn.functional as F

from unlearn_fast.models import create
from unlearn_fast.models.ec_modules import SepConv, build_ec_modules, ec_forward, ec_points
from unlearn_fast.ops.supcon import ec_unlearning_loss, supcon_loss
from unlearn_fast.reference.supcon import ec_unlearning_loss_ref, supcon_loss_ref

LAST = {"resnet18": 512, "resnet50": 2048, "swin_tiny": 768, "vit_small": 384}


def _final_and_branch_shapes(model, ec, x):
    """Spatial shape of each branch's conv output and of the last stage (forward hooks)."""
    shapes = {}
    hooks = [br.blocks.register_forward_hook(lambda m, i, o, k=k: shapes.__setitem__(k, tuple(o.shape)))
             for k, br in enumerate(ec.branches)]
    last = {"resnet18": "layer4", "resnet50": "layer4", "swin_tiny": "layers.3", "vit_small": "blocks.11"}
    name = model.unlearn_fast_name
    mod = dict(model.named_modules())[last[name]]
    hooks.append(mod.register_forward_hook(lambda m, i, o: shapes.__setitem__("last", tuple(o.shape))))
    out = ec_forward(model, ec, x)
    for h in hooks:
        h.remove()
    return out, shapes


@pytest.mark.parametrize("img", [32, 224])
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "swin_tiny", "vit_small"])
def test_branch_shapes_meta(name, img):
    # Shapes only: the model lives on the meta device (no memory, no arithmetic).
    with torch.device("meta"):
        model = create(name, num_classes=7, in_chans=3, img_size=img)
    ec = build_ec_modules(model)
    assert len(ec.branches) == 3 and ec.num_points == 4
    c = LAST[name]
    # module after stage k has N-k = 3, 2, 1 SepConvs, ending at the last stage's channels
    assert [len(br.blocks) for br in ec.branches] == [3, 2, 1]
    assert all(br.point.channels[-1] == c for br in ec.branches)
    out, shapes = _final_and_branch_shapes(model, ec, torch.empty(2, 3, img, img, device="meta"))
    assert [tuple(e.shape) for e in out.embeddings] == [(2, c)] * 4
    assert [tuple(lg.shape) for lg in out.layer_logits] == [(2, 7)] * 4
    if name.startswith("resnet"):
        hw = shapes["last"][2:]
    elif name == "swin_tiny":
        hw = shapes["last"][1:3]
    else:  # ViT: one resolution; each SepConv halves the token grid (ceil)
        g = model.patch_embed.grid_size[0]
        hw = None
        expect = [math.ceil(g / 2 ** k) for k in (3, 2, 1)]
        assert [shapes[k][2] for k in range(3)] == expect
    if hw is not None:
        assert all(shapes[k][2:] == hw for k in range(3)), (shapes, hw)


def test_extra_points_and_no_blocks_layouts():
    with torch.device("meta"):
        r50 = create("resnet50", num_classes=5, in_chans=3, img_size=224)
    pts, head = ec_points(r50, extra_points=2)
    assert head == "fc"
    assert [p.module for p in pts] == ["layer1", "layer2", "layer3", "layer4.0", "layer4.1"]
    assert [len(p.channels) - 1 for p in pts] == [3, 2, 1, 0, 0]
    pts, _ = ec_points(r50, with_blocks=False)
    assert [p.channels for p in pts] == [(256,), (512,), (1024,)]
    with pytest.raises(ValueError, match="extra_points"):
        ec_points(r50, extra_points=3)
    with torch.device("meta"):
        vgg = create("vgg16", num_classes=5, in_chans=3, img_size=32)
    with pytest.raises(ValueError, match="EC modules are defined"):
        build_ec_modules(vgg)


@pytest.mark.parametrize("name,img", [("small_cnn", 8), ("resnet18", 32)])
def test_real_forward_matches_model(name, img):
    torch.manual_seed(0)
    model = create(name, num_classes=6, in_chans=1, img_size=img).eval()
    ec = build_ec_modules(model).eval()
    x = torch.randn(2, 1, img, img)
    out = ec_forward(model, ec, x)
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(out.logits, ref)
    for z in out.embeddings:
        torch.testing.assert_close(z.norm(dim=1), torch.ones(2))
    # point L is the pooled feature entering the original classifier
    pooled = {}
    h = model.fc.register_forward_pre_hook(lambda m, i: pooled.__setitem__("x", i[0]))
    with torch.no_grad():
        model(x)
    h.remove()
    torch.testing.assert_close(out.embeddings[-1], F.normalize(pooled["x"], dim=1))
    expected_points = 2 if name == "small_cnn" else 3
    assert len(ec.branches) == expected_points
    # gradients reach the backbone and every branch
    loss = sum(lg.logsumexp(1).mean() + z.sum() for z, lg in zip(out.embeddings, out.layer_logits))
    loss.backward()
    assert all(p.grad is not None for p in ec.parameters())
    assert next(model.parameters()).grad is not None


def test_sepconv_halves_odd_sizes():
    y = SepConv(3, 5)(torch.randn(2, 3, 7, 9))
    assert y.shape == (2, 5, 4, 5)


# ------------------------------------------------------------------------------------- SupCon
def test_supcon_card_checks():
    z = torch.tensor([[1.0, 0.0]] * 4)
    assert supcon_loss(z, torch.zeros(4, dtype=torch.long)).item() == pytest.approx(math.log(3), abs=1e-6)
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    y = torch.tensor([0, 0, 1, 1])
    assert supcon_loss(z, y, 1.0, 1.0).item() == pytest.approx(math.log(1 + 2 / math.e), abs=1e-6)
    assert supcon_loss_ref(z, y, 1.0, 1.0).item() == pytest.approx(math.log(1 + 2 / math.e), abs=1e-12)


@pytest.mark.parametrize("m,d,k,tau", [(7, 5, 3, 0.07), (13, 3, 4, 0.5), (10, 17, 2, 1.0)])
def test_supcon_matches_float64_reference(m, d, k, tau):
    g = torch.Generator().manual_seed(m * d)
    raw = torch.randn(m, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (m,), generator=g)
    y[-1] = k + 5  # an anchor without positive: masked, not NaN
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        a = raw.detach().to(dtype).clone().requires_grad_(True)
        b = raw.detach().clone().requires_grad_(True)
        la = supcon_loss(F.normalize(a, dim=1), y, tau, 0.07)
        lb = supcon_loss_ref(F.normalize(b, dim=1), y, tau, 0.07)
        assert torch.isfinite(la)
        torch.testing.assert_close(la.double(), lb, rtol=tol, atol=tol)
        la.backward()
        lb.backward()
        assert torch.isfinite(a.grad).all()
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=tol * 10, atol=tol * 10)


def test_supcon_no_positive_is_zero_not_nan():
    z = F.normalize(torch.randn(4, 3), dim=1).requires_grad_(True)
    loss = supcon_loss(z, torch.arange(4))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(z.grad, torch.zeros_like(z))
    with pytest.raises(ValueError, match="labels"):
        supcon_loss(z, torch.arange(3))


@pytest.mark.parametrize("bf,br,d", [(3, 5, 7), (1, 9, 2)])
def test_ec_unlearning_loss_matches_reference(bf, br, d):
    g = torch.Generator().manual_seed(bf + br)
    zf = F.normalize(torch.randn(bf, d, generator=g), dim=1).requires_grad_(True)
    zr = F.normalize(torch.randn(br, d, generator=g), dim=1).requires_grad_(True)
    zf64, zr64 = zf.detach().double().requires_grad_(True), zr.detach().double().requires_grad_(True)
    la, lb = ec_unlearning_loss(zf, zr, 0.07), ec_unlearning_loss_ref(zf64, zr64, 0.07)
    torch.testing.assert_close(la.double(), lb, rtol=1e-5, atol=1e-5)
    la.backward()
    lb.backward()
    torch.testing.assert_close(zf.grad.double(), zf64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(zr.grad.double(), zr64.grad, rtol=1e-5, atol=1e-5)
    # identical embeddings: -1/tau (the minimum)
    u = torch.tensor([[1.0, 0.0]])
    assert ec_unlearning_loss(u, u.repeat(3, 1), 0.5).item() == pytest.approx(-2.0)
