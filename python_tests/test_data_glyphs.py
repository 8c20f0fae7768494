"""The generated ``glyphs`` data set: spec parsing, shapes and splits, determinism, labels that match the
characters (checked against clean un-jittered renders made here with PIL directly), the font fallback."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unlearn_fast.data import load, parse_spec
from unlearn_fast.data import glyphs as G


def test_parse_spec_and_bad_arguments():
    assert parse_spec("glyphs") == ("glyphs", None)
    assert parse_spec("glyphs:40") == ("glyphs", "40")
    assert parse_spec("GLYPHS:7:20") == ("glyphs", "7:20")
    assert G.parse_glyph_arg(None) == (48, 300)
    assert G.parse_glyph_arg("40") == (40, 300)
    assert G.parse_glyph_arg("7:20") == (7, 20)
    for bad in ("1", "63", "abc", "4:0", "4:5:6", "4:x"):
        with pytest.raises(ValueError, match="glyphs"):
            load(f"glyphs:{bad}")


def test_load_shapes_splits_and_names():
    b = load("glyphs:7:20", seed=3)
    assert b.num_classes == 7 and b.in_chans == 1 and b.img_size == 16
    assert b.class_names == list("0123456")
    assert len(b.train) + len(b.val) + len(b.test) == 140
    for s in ("train", "val", "test"):
        counts = torch.bincount(b.targets[s], minlength=7)
        assert (counts == counts[0]).all(), f"{s} split is not stratified: {counts.tolist()}"
    x, y = b.train[0]
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32 and 0 <= y < 7
    b28 = load("glyphs:7:20", img_size=28, seed=3)
    assert b28.img_size == 28 and b28.train[0][0].shape == (1, 28, 28)
    assert G.GLYPH_CHARS[36:51] == "abdefghijmnqrty" and len(set(G.GLYPH_CHARS)) == len(G.GLYPH_CHARS) == 62


def test_deterministic_and_prefix_stable():
    a, la, _ = G.render_glyphs.__wrapped__(5, 12)
    b, lb, _ = G.render_glyphs.__wrapped__(5, 12)
    assert torch.equal(a, b) and np.array_equal(la, lb)
    c, _, _ = G.render_glyphs.__wrapped__(5, 20)  # image i of class k depends on (k, i) only
    assert torch.equal(a.view(5, 12, 1, 28, 28), c.view(5, 20, 1, 28, 28)[:, :12])
    assert a.dtype == torch.uint8 and la.tolist() == sorted(la.tolist())
    # the jitter varies the images of one class
    assert (a[0].float() - a[1].float()).abs().mean() > 5


def _clean_templates(chars: str) -> torch.Tensor:
    """Each character drawn by PIL in every DejaVu face, centred, no rotation / shear / scale jitter,
    rolled by -3..3 px both ways, 3x3 box-blurred: ``[shifts * faces, k, 784]`` zero-mean unit rows."""
    from PIL import Image, ImageDraw, ImageFont

    raw = []
    for face in G.DEJAVU_FACES:
        font = ImageFont.truetype(f"{G.DEJAVU_DIR}/{face}", int(28 * 4 * 0.62 * 0.92))
        for ch in chars:
            img = Image.new("L", (112, 112), 0)
            ImageDraw.Draw(img).text((56, 56), ch, fill=255, font=font, anchor="mm")
            raw.append(torch.from_numpy(np.asarray(img.reduce(4), dtype=np.float32)))
    raw = torch.stack(raw)
    t = torch.stack([torch.roll(raw, (dy, dx), (1, 2)) for dy in range(-3, 4) for dx in range(-3, 4)])
    return _unit(t.reshape(-1, 28, 28)).reshape(-1, len(chars), 784)


def _unit(x: torch.Tensor) -> torch.Tensor:
    x = F.avg_pool2d(x.reshape(-1, 1, 28, 28).float(), 3, 1, 1).reshape(x.shape[0], -1)
    return F.normalize(x - x.mean(1, keepdim=True), dim=1)


@pytest.mark.skipif(not __import__("os").path.exists(f"{G.DEJAVU_DIR}/DejaVuSans.ttf"),
                    reason="DejaVu fonts not installed (Debian fonts-dejavu-core)")
def test_labels_match_characters():
    """Template matching against clean renders: the label names the character drawn."""
    n = 12
    imgs, labels, dejavu = G.render_glyphs.__wrapped__(n, 30)
    assert dejavu
    t = _clean_templates(G.GLYPH_CHARS[:n])                     # [S*F, n, 784]
    x = _unit(imgs)                                               # [N, 784]
    pred = torch.einsum("nd,skd->nsk", x, t).amax(1).argmax(1).numpy()  # best face and shift per class
    acc = float((pred == labels).mean())
    assert acc > 0.85, f"template matching found the labelled character in only {acc:.0%} of images"
    # a label permutation must destroy the match
    assert float((pred == np.roll(labels, 30)).mean()) < 0.2


def test_fallback_font_without_dejavu(monkeypatch, caplog):
    monkeypatch.setattr(G, "DEJAVU_DIR", "/nonexistent/fonts")
    with caplog.at_level(logging.WARNING, logger="unlearn_fast"):
        imgs, labels, dejavu = G.render_glyphs.__wrapped__(4, 6)
    assert not dejavu and "fonts-dejavu-core" in caplog.text
    assert imgs.shape == (24, 1, 28, 28) and imgs.float().mean() > 5  # something was drawn
