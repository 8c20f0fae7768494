"""`import unlearn_fast` works without the compiled module: one clear warning, HAS_C False, and the ops
fall back to the reference path."""
import subprocess
import sys
import textwrap


def test_import_without_compiled_module_warns_once_and_falls_back():
    code = textwrap.dedent("""
        import sys, warnings
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "unlearn_fast._C":
                    raise ImportError("simulated: extension not built")
        sys.meta_path.insert(0, Block())
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import unlearn_fast
            from unlearn_fast import _ext
            from unlearn_fast.ops import metrics
            import torch
            p, q = torch.randn(4, 5), torch.randn(4, 5)
            js = metrics.js_divergence(p, q)
        msgs = [str(x.message) for x in w if "unlearn_fast._C" in str(x.message)]
        assert len(msgs) == 1, msgs
        assert "pip install -e ." in msgs[0]
        assert not unlearn_fast.HAS_C and not _ext.HAS_C
        assert js.shape == (4,) and bool((js >= 0).all())
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
