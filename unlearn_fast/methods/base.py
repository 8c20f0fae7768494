"""What every method receives (:class:`RunContext`) and the hyper-parameter plumbing."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unlearn_fast.data import DataBundle
from unlearn_fast.methods.run_options import RunOptions

__all__ = ["RunContext", "RunOptions", "Method", "MethodOutput", "artefact_meta"]


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
    # run options (methods.run_options): how the run uses the machine; see apply_run_options
    workers: int | None = None            # DataLoader workers; None: data.pipeline.default_workers
    channels_last: bool = False           # NHWC layout (CUDA only)
    bf16: bool = False                    # bf16 autocast in every training stage (CUDA only)
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

    # -- run options (methods.run_options) ---------------------------------------------------
    def apply_run_options(self, opts: RunOptions) -> None:
        """Adopt validated run options; on a device other than CUDA, ``channels_last`` and ``bf16`` are
        ignored with a note. Also sets the worker count of evaluation passes (data.pipeline)."""
        from unlearn_fast.data.pipeline import set_eval_workers

        cuda = self.device.type == "cuda"
        for name in ("channels_last", "bf16"):
            if getattr(opts, name) and not cuda:
                self.say(f"--{name.replace('_', '-')} applies on CUDA only; ignored on {self.device.type}")
        self.workers, self.channels_last, self.bf16 = opts.workers, opts.channels_last and cuda, opts.bf16 and cuda
        set_eval_workers(self.num_workers())

    def num_workers(self) -> int:
        """DataLoader workers for this run's training data: the ``workers`` option, else the default
        (``min(8, CPUs)`` for lazily decoded data on CUDA, 0 otherwise)."""
        from unlearn_fast.data.pipeline import default_workers

        return self.workers if self.workers is not None else default_workers(self.data.train, self.device)

    def loop_options(self, amp: bool = False) -> dict[str, Any]:
        """The run options as ``LoopConfig`` fields: ``LoopConfig(..., **ctx.loop_options(amp=hp.amp))``.

        ``amp``: the method's own setting; ``bf16`` turns it on for every stage (on CUDA; the loop never
        autocasts elsewhere). ``pin_memory`` is left to the loop (on when the device is CUDA)."""
        return {"num_workers": self.num_workers(), "channels_last": bool(self.channels_last),
                "amp": bool(amp or self.bf16)}

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
        what = {"kind": kind, "data": self._data_fp, "model": self.model_name, "model_kwargs": self.model_kwargs,
                "seed": self.seed, "hparams": hparams, "inputs": inputs or {}}
        if self.bf16:  # changes the numbers (workers / channels_last do not); absent otherwise: old fingerprints hold
            what["bf16"] = True
        return fingerprint(what)

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

        from unlearn_fast.distributed import is_main

        self.notes.append(msg)
        if is_main():  # torchrun: one copy of each note
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

    def check_inputs(self, data: Any) -> None:
        """Refuse settings that cannot work with this run's data (a ``DataBundle``) with one clear
        ValueError - called by ``train`` / ``compare`` before any training or write. Default: nothing to check."""

    def run(self, ctx: RunContext) -> MethodOutput:  # pragma: no cover - interface
        raise NotImplementedError
