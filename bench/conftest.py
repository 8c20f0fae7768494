"""Shared bench fixtures: the device name, CUDA timing, and results merged into
``bench/results/<device>.json`` (one JSON object per device; each test writes its own keys)."""
from __future__ import annotations

import json
import os
import platform
import re
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def device_slug() -> str:
    """File-name-safe device name: e.g. 'nvidia-h100-80gb-hbm3', or 'cpu-x86_64' without a GPU."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
    else:
        name = f"cpu-{platform.machine()}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def write_results(device: str, section: str, data: dict[str, Any]) -> Path:
    """Merge ``{section: data}`` into bench/results/<device>.json (keys of other sections are kept)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{device}.json"
    current: dict[str, Any] = {}
    if path.exists():
        try:
            current = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise RuntimeError(f"{path} is not valid JSON ({exc}); fix or delete it") from exc
    entry = dict(current.get(section, {}))
    entry.update(data)
    entry["measured"] = time.strftime("%Y-%m-%d")
    entry["torch"] = torch.__version__
    current[section] = entry
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def cuda_time_ms(fn: Callable[[], Any], reps: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in ms with CUDA synchronisation (CPU timer when no GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


@pytest.fixture(scope="session", autouse=True)
def _tf32_on():
    """Benchmarks run fp32 with TF32 for matmul and conv (DESIGN §8), set explicitly through torch's
    fp32_precision API (``unlearn_fast.ops.backend.set_tf32``) for torch and the Triton kernels alike."""
    from unlearn_fast.ops.backend import tf32_policy

    with tf32_policy(True):
        yield


@pytest.fixture(scope="session")
def device_name() -> str:
    return device_slug()


@pytest.fixture(scope="session")
def record(device_name: str) -> Callable[[str, dict[str, Any]], Path]:
    """``record(section, {key: value})`` merges results into bench/results/<device>.json."""
    return lambda section, data: write_results(device_name, section, data)
