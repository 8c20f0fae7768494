"""WF Alg. 2 loss: half-batch split, label expansion (chi copies of the retain half on random other
rows), L = l0 S_r + l1 / S_u + l2 R, computed in one mixed-label forward."""
import torch
import torch.nn.functional as F

from unlearn_fast.methods.wf import wf_loss
from unlearn_fast.models import create
from unlearn_fast.nn import wrap


def test_wf_loss_matches_alg2_written_out():
    torch.manual_seed(0)
    wf = wrap(create("small_cnn", num_classes=5, in_chans=1, img_size=8).eval(), 5)
    with torch.no_grad():
        for a in wf.alpha_parameters():
            a.uniform_(-3, 3)
    x = torch.randn(8, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    chi, lam = 3, (1.0, 10.0, 2.0)
    loss, parts = wf_loss(wf, x, y, chi, lam, torch.Generator().manual_seed(7))
    # the same with the random rows drawn the same way, written as Alg. 2's loop
    g = torch.Generator().manual_seed(7)
    shifts = torch.randint(1, 5, (chi, 4), generator=g)
    s_u = F.cross_entropy(wf(x[:4], y[:4]), y[:4])
    s_r = torch.stack([F.cross_entropy(wf(x[4:], (y[4:] + shifts[i]) % 5), y[4:]) for i in range(chi)]).mean()
    expect = lam[0] * s_r + lam[1] / s_u + lam[2] * wf.regularizer()
    assert torch.allclose(loss, expect, rtol=1e-5)
    assert abs(parts["S_u"] - s_u.item()) < 1e-5 and abs(parts["S_r"] - s_r.item()) < 1e-5
    # retain rows are never the sample's own class
    assert ((y[4:] + shifts) % 5 != y[4:]).all()
    # gradients reach alphas only
    loss.backward()
    assert all(a.grad is not None for a in wf.alpha_parameters())
    assert all(p.grad is None for n, p in wf.named_parameters() if "alpha" not in n)
