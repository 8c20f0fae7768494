#!/usr/bin/env python3
"""Two commands on a fresh machine that has only Python 3.10+:

    python dev.py demo     # set up .venv (torch, the package and its extension), run `unlearn-fast demo`
    python dev.py test     # the same environment plus the test tools, run the test suite

Both are idempotent: a second call reuses the environment and the build, and only reinstalls what
changed (a stamp in the environment records the hash of the build inputs: pyproject.toml, setup.py,
build_backend/, csrc/, the torch pins and the build switches). Other verbs:

    python dev.py setup [--test]        # only set up
    python dev.py run CMD [ARGS...]     # run any command inside the environment, e.g.
                                        #   python dev.py run unlearn-fast recipe mnist-wf --check

Settings (environment variables): UNLEARN_FAST_VENV (the environment's folder, default .venv),
UNLEARN_FAST_TORCH (the torch requirement, default "torch==2.14.1 torchvision==0.29.1"), and the
build switches UNLEARN_FAST_SKIP_CUDA / UNLEARN_FAST_NO_EXT / TORCH_CUDA_ARCH_LIST (see README).
Arguments after the verb go to the demo / pytest. People who bring their own environment use
`pip install -e .` instead (README).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEFAULT_TORCH = "torch==2.14.1 torchvision==0.29.1"
BUILD_SWITCHES = ("UNLEARN_FAST_SKIP_CUDA", "UNLEARN_FAST_NO_EXT", "TORCH_CUDA_ARCH_LIST")
BUILD_INPUTS = ("pyproject.toml", "setup.py", "build_backend", "csrc")
TEST_COMMAND = ["-m", "pytest", "python_tests", "-q"]
STAMP = "unlearn_fast.stamp.json"


def venv_dir() -> Path:
    return Path(os.environ.get("UNLEARN_FAST_VENV", ROOT / ".venv")).resolve()


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def build_hash(root: Path = ROOT, env: dict[str, str] | None = None) -> str:
    """Hash of everything that decides what `pip install -e .` builds (file contents, torch pins,
    build switches); a change in any of them means the package is installed again."""
    env = os.environ if env is None else env
    h = hashlib.sha256()
    for name in BUILD_INPUTS:
        p = root / name
        files = sorted(f for f in p.rglob("*") if f.is_file() and "__pycache__" not in f.parts) if p.is_dir() else [p]
        for f in files:
            if f.exists():
                h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    h.update(env.get("UNLEARN_FAST_TORCH", DEFAULT_TORCH).encode())
    for k in BUILD_SWITCHES:
        h.update(f"{k}={env.get(k, '')}".encode())
    return h.hexdigest()


def read_stamp(venv: Path) -> dict:
    try:
        return json.loads((venv / STAMP).read_text())
    except (OSError, ValueError):
        return {}


def test_tools(root: Path = ROOT) -> list[str]:
    """The `test` extra of pyproject.toml (installed on its own: no rebuild of the package)."""
    m = re.search(r"^test\s*=\s*\[(.*?)\]", (root / "pyproject.toml").read_text(), re.M | re.S)
    if not m:
        sys.exit("[dev] error: pyproject.toml has no `test = [...]` optional dependency list")
    return re.findall(r'"([^"]+)"', m.group(1))


def steps_needed(stamp: dict, want_test: bool, build: str) -> list[str]:
    """What setup must still do, given the stamp of the previous setup."""
    steps = []
    if stamp.get("torch") != os.environ.get("UNLEARN_FAST_TORCH", DEFAULT_TORCH):
        steps.append("torch")
    if stamp.get("build") != build:
        steps.append("package")
    if want_test and not stamp.get("test"):
        steps.append("test-tools")
    return steps


def _run(cmd: list[str], what: str) -> None:
    t0 = time.perf_counter()
    print(f"[dev] {what}: {' '.join(str(c) for c in cmd)}", flush=True)
    rc = subprocess.call([str(c) for c in cmd], cwd=ROOT)
    if rc != 0:
        sys.exit(f"[dev] error: {what} failed (exit code {rc}); fix the message above and run the same command again")
    print(f"[dev] {what}: done in {time.perf_counter() - t0:.0f} s", flush=True)


def setup(want_test: bool) -> Path:
    """Create/refresh the environment; returns its python."""
    if sys.version_info < (3, 10):
        sys.exit(f"[dev] error: Python 3.10+ is needed, this is {sys.version.split()[0]}; run dev.py with a newer python")
    venv = venv_dir()
    py = venv_python(venv)
    if not py.exists():
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, "-m", "venv", str(venv)])
        if rc != 0 or not py.exists():
            sys.exit(f"[dev] error: could not create a virtual environment in {venv} (on Debian/Ubuntu: apt-get install "
                     "python3-venv); or bring your own environment and use `pip install -e .` (README)")
        print(f"[dev] created {venv} in {time.perf_counter() - t0:.0f} s", flush=True)
    stamp = read_stamp(venv)
    build = build_hash()
    steps = steps_needed(stamp, want_test, build)
    if not steps:
        print(f"[dev] environment {venv} is up to date", flush=True)
        return py
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    torch_req = os.environ.get("UNLEARN_FAST_TORCH", DEFAULT_TORCH)
    if "torch" in steps:
        # torch first: the extension build reuses it (pyproject.toml does not list it for the build).
        _run(pip + torch_req.split(), "install torch")
        stamp.update(torch=torch_req, build=None)
        _write_stamp(venv, stamp)
        steps = steps_needed(stamp, want_test, build)
    if "package" in steps:
        _run(pip + ["ninja"], "install the build tool")
        _run(pip + ["-e", "."], "build and install unlearn_fast")
        stamp.update(build=build)
        _write_stamp(venv, stamp)
    if "test-tools" in steps:
        _run(pip + test_tools(), "install the test tools")
        stamp.update(test=True)
        _write_stamp(venv, stamp)
    return py


def _write_stamp(venv: Path, stamp: dict) -> None:
    tmp = venv / (STAMP + ".tmp")
    tmp.write_text(json.dumps(stamp, indent=1))
    os.replace(tmp, venv / STAMP)


def _exec(py: Path, args: list[str]) -> int:
    env = dict(os.environ)
    bindir = str(py.parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["VIRTUAL_ENV"] = str(py.parent.parent)
    return subprocess.call(args, cwd=ROOT, env=env)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbs = ("demo", "test", "setup", "run")
    if not argv or argv[0] not in verbs:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    verb, rest = argv[0], argv[1:]
    if verb == "run" and not rest:
        sys.exit("[dev] error: `dev.py run` needs a command, e.g. python dev.py run unlearn-fast list")
    want_test = verb == "test" or (verb == "setup" and "--test" in rest)
    t0 = time.perf_counter()
    py = setup(want_test)
    print(f"[dev] setup: {time.perf_counter() - t0:.0f} s", flush=True)
    if verb == "setup":
        return 0
    if verb == "demo":
        return _exec(py, [str(py), "-m", "unlearn_fast.cli", "demo", *rest])
    if verb == "test":
        return _exec(py, [str(py), *TEST_COMMAND, *rest])
    return _exec(py, rest)


if __name__ == "__main__":
    sys.exit(main())
