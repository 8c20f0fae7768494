"""Backbone registry (torchvision / timm / a small CPU CNN), random init, local weights only.

    model = create("resnet18", num_classes=10, in_chans=1, img_size=32, weights="original.safetensors")
    model_family("resnet18")        # "cnn" (or "vit") -> picks the WF recipe
    feature_layers(model, "resnet18")  # ["conv1", "layer1.0", ..., "avgpool", "fc"]

Importing this package registers the built-in models; torchvision / timm are imported lazily.
"""
from __future__ import annotations

from unlearn_fast.models.registry import (
    FAMILIES,
    create,
    feature_layers,
    list_models,
    model_family,
    register_model,
)
from unlearn_fast.models.weights import load_weights, read_state_dict, save_weights
from unlearn_fast.models import backbones as _backbones  # noqa: F401  (registers the built-ins)
from unlearn_fast.models import small_cnn as _small_cnn  # noqa: F401
from unlearn_fast.models.small_cnn import SmallCNN

__all__ = [
    "FAMILIES",
    "SmallCNN",
    "create",
    "feature_layers",
    "list_models",
    "load_weights",
    "model_family",
    "read_state_dict",
    "register_model",
    "save_weights",
]
