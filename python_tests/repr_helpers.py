"""Shared tiny fixtures for the representation-metric tests (IDI, probe, k-NN, MIA, compare rows):
small CNNs trained on the embedded 8x8 ``digits`` set with a plain SGD loop (a few seconds on 1 thread).

``digits_models()`` -> ``(data, original, retrained, headonly)``: the original model on all 10 classes,
a model trained from scratch without the forget classes (1, 3), and ``headonly``: the original with the
forget classes' logits pushed down by 100 in the final layer's bias - its outputs forget, its features are
the original's exactly (the extreme "superficial forgetting" that the representation metrics must expose)."""
from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F

FORGET = [1, 3]


def _fit(model, x, y, epochs, lr, seed):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for s in range(0, len(y), 128):
            i = perm[s:s + 128]
            loss = F.cross_entropy(model(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@functools.lru_cache(maxsize=1)
def digits_models():
    from unlearn_fast.data import load
    from unlearn_fast.models import create

    torch.set_num_threads(1)
    data = load("digits")
    x, y = data.tensors("train")
    keep = ~torch.isin(y, torch.tensor(FORGET))
    torch.manual_seed(0)
    original = _fit(create("small_cnn", num_classes=10, in_chans=1, img_size=8), x, y, 6, 0.1, 0)
    torch.manual_seed(1)
    retrained = _fit(create("small_cnn", num_classes=10, in_chans=1, img_size=8), x[keep], y[keep], 6, 0.1, 1)
    headonly = copy.deepcopy(original)
    with torch.no_grad():
        headonly.fc.bias[FORGET] -= 100.0
    return data, original, retrained, headonly
