"""Run-directory integrity: atomic writes, fingerprints of what produced a file, and a process lock.

* :func:`atomic_write_text` / :func:`atomic_write_json`: write to a temporary name in the same
  folder, fsync, rename - a kill at any moment leaves either the old file or the new one, never a
  truncated one.
* :func:`fingerprint`: a short SHA-256 of the canonical JSON of everything that determines an
  artefact (data manifest, model, seed, resolved hyper-parameters, the fingerprints of its inputs).
  An artefact whose stored fingerprint differs from the one asked for is stale and is recomputed.
* :func:`tensors_digest`: a content hash of a state dict - the identity of a trained model, so that a
  model trained again (even with the same settings) invalidates what was derived from the old one.
* :class:`RunLock`: an exclusive, non-blocking ``flock`` on ``RUN/.lock`` held for the duration of a
  command (re-entrant inside one process); the kernel drops it when the process dies.

Imports only the standard library and torch (bottom layer, DESIGN §1).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

from unlearn_fast.distributed import is_main, main_rank_only

__all__ = ["atomic_write_text", "atomic_write_json", "fingerprint", "tensors_digest", "RunLock",
           "RunDirBusy", "check_writable_dir"]


@main_rank_only
def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` by ``text`` atomically (same-folder temporary file + fsync + rename); in a
    process group rank 0 alone writes (:func:`unlearn_fast.distributed.main_rank_only`)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; a run dir's files follow the umask
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _json_default(obj: Any) -> Any:
    """JSON for what ``json`` does not know: tensors / arrays (``tolist``) and paths."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, allow_nan=True, default=_json_default))


def fingerprint(obj: Any) -> str:
    """16 hex digits of SHA-256 over the canonical JSON (sorted keys) of ``obj``."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def tensors_digest(tensors: Mapping[str, Any]) -> str:
    """16 hex digits of SHA-256 over names, dtypes, shapes and bytes of a state dict (sorted by name)."""
    import torch

    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().contiguous().cpu()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def check_writable_dir(path: str | os.PathLike) -> None:
    """Raise ValueError (one line) when ``path`` cannot be a run directory: it is a file, or it (or the
    nearest existing parent, where it would be created) is not writable."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"run directory {p} is a file, not a directory; pass another --run-dir")
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"cannot create run directory {p}: {probe} is a file; pass another --run-dir")
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "run directory" if probe == p else "parent folder"
        raise ValueError(f"{where} {probe} is not writable; fix its permissions or pass another --run-dir")
    if p.exists():
        for sub in ("state", "retrain", "figures"):
            q = p / sub
            if q.exists() and not os.access(q, os.W_OK | os.X_OK):
                raise ValueError(f"{q} is not writable; fix its permissions or pass another --run-dir")


class RunDirBusy(ValueError):
    """Another process holds the run directory."""


_HELD: dict[str, list] = {}   # realpath -> [fd, depth]


class RunLock:
    """``with RunLock(run_dir):`` - exclusive use of a run directory by this process (re-entrant).

    Creates the directory (the caller validates inputs first). A second process gets
    :class:`RunDirBusy` at once, with the holder's pid. In a process group (torchrun) rank 0 holds the
    lock for all ranks; the others take none."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.key = ""

    def __enter__(self) -> "RunLock":
        import fcntl

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.key = os.path.realpath(self.run_dir)
        if not is_main():
            self.key = ""
            return self
        held = _HELD.get(self.key)
        if held is not None:
            held[1] += 1
            return self
        path = self.run_dir / ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            try:
                pid = os.pread(fd, 32, 0).decode().strip() or "?"
            except OSError:
                pid = "?"
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunDirBusy(f"run directory {self.run_dir} is in use by another unlearn_fast process (pid {pid}); "
                                 "wait for it to finish or pass another --run-dir") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        _HELD[self.key] = [fd, 1]
        return self

    def __exit__(self, *exc: Any) -> None:
        import fcntl

        held = _HELD.get(self.key)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del _HELD[self.key]
            fcntl.flock(held[0], fcntl.LOCK_UN)
            os.close(held[0])
