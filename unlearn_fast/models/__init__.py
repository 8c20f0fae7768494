"""Backbone registry (torchvision / timm / a small CPU CNN), random init, local weights only.

    model = create("resnet18", num_classes=10, in_chans=1, img_size=32, weights="original.safetensors")
    model_family("resnet18")        # "cnn" (or "vit") -> picks the WF recipe
    feature_layers(model, "resnet18")  # ["conv1", "layer1.0", ..., "avgpool", "fc"]

    create("timm:convnext_atto", num_classes=10, in_chans=1, img_size=32)   # any timm model
    create("tv:mobilenet_v3_small", num_classes=10, weights="mine.pth")        # any torchvision classifier

Importing this package registers the built-in models and the ``timm:`` / ``tv:`` prefixes (``list_prefixes()``;
family, feature layers and EC points of those chosen by rule: ``models.named``, ``models.stages``);
torchvision / timm are imported lazily.
"""
from __future__ import annotations

from unlearn_fast.models.registry import (
    FAMILIES,
    create,
    feature_layers,
    is_model_name,
    list_models,
    list_prefixes,
    model_family,
    register_model,
    register_prefix,
)
from unlearn_fast.models.weights import load_weights, read_state_dict, save_weights
from unlearn_fast.models import backbones as _backbones  # noqa: F401  (registers the built-ins)
from unlearn_fast.models import small_cnn as _small_cnn  # noqa: F401
from unlearn_fast.models import named as _named  # noqa: F401  (timm:<name>, tv:<name>)
from unlearn_fast.models.small_cnn import SmallCNN

__all__ = [
    "FAMILIES",
    "SmallCNN",
    "create",
    "feature_layers",
    "is_model_name",
    "list_models",
    "list_prefixes",
    "load_weights",
    "model_family",
    "read_state_dict",
    "register_model",
    "register_prefix",
    "save_weights",
]
