"""dev.py (the README's two commands): what decides a rebuild, and what a second call skips."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dev():
    spec = importlib.util.spec_from_file_location("dev_script", ROOT / "dev.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def tree(tmp_path):
    for name in ("pyproject.toml", "setup.py"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "a.cpp").write_text("int a;\n")
    (tmp_path / "build_backend").mkdir()
    return tmp_path


def test_build_hash_follows_build_inputs(dev, tree):
    env = {}
    h0 = dev.build_hash(tree, env)
    assert dev.build_hash(tree, env) == h0                        # deterministic
    (tree / "csrc" / "a.cpp").write_text("int b;\n")
    h1 = dev.build_hash(tree, env)
    assert h1 != h0                                               # a C++ source changed -> rebuild
    assert dev.build_hash(tree, {"UNLEARN_FAST_SKIP_CUDA": "1"}) != h1   # a build switch changed
    assert dev.build_hash(tree, {"UNLEARN_FAST_TORCH": "torch==2.4"}) != h1
    (tree / "README.md").write_text("docs only\n")
    assert dev.build_hash(tree, env) == h1                        # not a build input


def test_second_call_skips_everything(dev, monkeypatch):
    monkeypatch.delenv("UNLEARN_FAST_TORCH", raising=False)
    assert dev.steps_needed({}, True, "h") == ["torch", "package", "test-tools"]
    done = {"torch": dev.DEFAULT_TORCH, "build": "h", "test": True}
    assert dev.steps_needed(done, True, "h") == []
    assert dev.steps_needed(done, False, "h") == []
    assert dev.steps_needed(done, True, "h2") == ["package"]      # rebuild only the package
    assert dev.steps_needed({**done, "test": False}, True, "h") == ["test-tools"]
    monkeypatch.setenv("UNLEARN_FAST_TORCH", "torch==2.4")
    assert dev.steps_needed(done, False, "h")[0] == "torch"


def test_test_tools_are_the_pyproject_extra(dev):
    tools = dev.test_tools()
    assert "pytest" in tools and "pytest-benchmark" in tools
    assert all(t in (ROOT / "pyproject.toml").read_text() for t in tools)


def test_unknown_verb_is_refused():
    r = subprocess.run([sys.executable, str(ROOT / "dev.py"), "install"], capture_output=True, text=True)
    assert r.returncode == 2 and "python dev.py demo" in r.stdout


def test_readme_and_ci_use_the_same_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python dev.py test" in readme
    assert "\npython dev.py test\n" in ci
