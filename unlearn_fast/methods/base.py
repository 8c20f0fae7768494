"""What every method receives (:class:`RunContext`) and the hyper-parameter plumbing."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unlearn_fast.data import DataBundle

__all__ = ["RunContext", "Method", "MethodOutput"]


@dataclass
class RunContext:
    """Everything a method needs: data, the model recipe, where to write, and on what device."""

    data: DataBundle
    model_name: str
    run_dir: Path
    device: torch.device
    seed: int = 0
    progress: bool = True
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    forget: list[int] | None = None       # the forget request's classes (unlearning methods)

    def new_model(self, seed: int | None = None) -> nn.Module:
        """A freshly initialised model; its init is a function of ``seed`` (default: the run's seed) and
        leaves the global RNG streams untouched."""
        from unlearn_fast.models import create

        with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
            torch.manual_seed(self.seed if seed is None else seed)
            model = create(self.model_name, num_classes=self.data.num_classes, in_chans=self.data.in_chans,
                           img_size=self.data.img_size, **self.model_kwargs)
        return model.to(self.device)

    def seed_method(self, name: str) -> None:
        """Seed the global RNGs from (run seed, method name): a method's result does not depend on what
        ran before it in the same process (dropout, loader seeds)."""
        import zlib

        torch.manual_seed(zlib.crc32(f"{self.seed}:{name}".encode()))

    @property
    def state_dir(self) -> Path:
        d = self.run_dir / "state"
        d.mkdir(parents=True, exist_ok=True)
        return d


@dataclass
class MethodOutput:
    model: nn.Module
    artefacts: dict[str, Path] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


class Method:
    """Base class: a dataclass-like bag of hyper-parameters (``Hparams``) and ``run(ctx)``."""

    name: str = "?"

    @dataclass
    class Hparams:
        pass

    def __init__(self, **overrides: Any) -> None:
        fields = {f.name for f in dataclasses.fields(self.Hparams)}
        preset = overrides.pop("preset", None)
        base = self.presets().get(preset, {}) if preset else {}
        if preset and preset not in self.presets():
            raise ValueError(f"{self.name}: unknown preset {preset!r}; available: {sorted(self.presets())}")
        unknown = set(overrides) - fields
        if unknown:
            raise ValueError(f"{self.name}: unknown hyper-parameter(s) {sorted(unknown)}; known: {sorted(fields)}")
        self.hp = self.Hparams(**{**base, **overrides})
        self.preset = preset

    @classmethod
    def presets(cls) -> dict[str, dict[str, Any]]:
        return {}

    def hparams(self) -> dict[str, Any]:
        return dataclasses.asdict(self.hp)

    def run(self, ctx: RunContext) -> MethodOutput:  # pragma: no cover - interface
        raise NotImplementedError
