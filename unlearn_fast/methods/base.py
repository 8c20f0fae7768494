"""What every method receives (:class:`RunContext`) and the hyper-parameter plumbing."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unlearn_fast.data import DataBundle

__all__ = ["RunContext", "Method", "MethodOutput", "artefact_meta"]


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
    notes: list[str] = field(default_factory=list)
    _data_fp: str | None = field(default=None, repr=False)

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

    # -- run-directory integrity (unlearn_fast.run_files) -----------------------------------
    def fingerprint(self, kind: str, hparams: dict[str, Any], inputs: dict[str, Any] | None = None) -> str:
        """What determines an artefact: data manifest, model, seed, its hyper-parameters and the
        identities (content digests) of its inputs."""
        from unlearn_fast.run_files import fingerprint

        if self._data_fp is None:
            self._data_fp = fingerprint(self.data.manifest())
        return fingerprint({"kind": kind, "data": self._data_fp, "model": self.model_name,
                            "model_kwargs": self.model_kwargs, "seed": self.seed, "hparams": hparams,
                            "inputs": inputs or {}})

    def current(self, path: Path, fp: str) -> bool:
        """True when ``path`` exists and was made with fingerprint ``fp``; a stale file is announced
        (it is replaced once the step has been computed again)."""
        if not path.exists():
            return False
        meta = artefact_meta(path)
        if meta.get("fingerprint") == fp:
            return True
        old = meta.get("hparams")
        self.say(f"{path.relative_to(self.run_dir)} was made with other settings or inputs"
                 + (f" (hyper-parameters then: {old})" if old else "") + "; computing it again")
        return False

    def say(self, msg: str) -> None:
        """A one-line note for the user (stderr) and for the run's record."""
        import sys

        self.notes.append(msg)
        print(f"unlearn_fast: {msg}", file=sys.stderr, flush=True)


def artefact_meta(path: Path) -> dict[str, Any]:
    """The unlearn_fast metadata stored in a ``.safetensors`` artefact ({} when unreadable)."""
    from unlearn_fast.models.io import read_metadata

    try:
        return read_metadata(path)
    except (OSError, ValueError):
        return {}


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

    # allowed values of string-valued hyper-parameters, e.g. {"optimizer": ("sgd", "adam")}
    CHOICES: dict[str, tuple] = {}

    def __init__(self, **overrides: Any) -> None:
        from unlearn_fast.methods.hparams import check_defaults, coerce_hparams

        preset = overrides.pop("preset", None)
        if preset is not None and preset not in self.presets():
            known = sorted(self.presets()) or "none"
            raise ValueError(f"{self.name}: unknown preset {preset!r}; available: {known}")
        base = self.presets().get(preset, {}) if preset else {}
        values = coerce_hparams(self.name, self.Hparams, {**base, **overrides}, self.CHOICES)
        self.hp = self.Hparams(**values)
        check_defaults(self.name, self.hp, self.CHOICES)
        self.preset = preset

    @classmethod
    def presets(cls) -> dict[str, dict[str, Any]]:
        return {}

    def hparams(self) -> dict[str, Any]:
        return asdict(self.hp)

    def run(self, ctx: RunContext) -> MethodOutput:  # pragma: no cover - interface
        raise NotImplementedError
