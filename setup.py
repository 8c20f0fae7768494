"""Build of unlearn_fast and its extension module ``unlearn_fast._C``.

C++ (CPU) sources in csrc/ are always built. CUDA sources in csrc/cuda/ are added when torch was
built with CUDA and nvcc is found; set ``UNLEARN_FAST_SKIP_CUDA=1`` to build the CPU part only.
``UNLEARN_FAST_NO_EXT=1`` skips the extension entirely (the package then warns once at import and
uses the reference path).
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0+PTX"


def _extensions():
    if os.environ.get("UNLEARN_FAST_NO_EXT", "0") == "1":
        return [], {}
    if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda/lib64"):
        # nvcc on PATH at /usr/local/bin makes torch guess CUDA_HOME=/usr/local, which has no libcudart.
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    from torch.utils import cpp_extension as ce

    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    skip_cuda = os.environ.get("UNLEARN_FAST_SKIP_CUDA", "0") == "1"
    import torch

    use_cuda = bool(cu) and not skip_cuda and torch.version.cuda is not None and ce.CUDA_HOME is not None
    cxx = ["-O3", "-std=c++20"]  # torch >= 2.10 headers need C++20
    define = []
    if use_cuda:
        # A100 (8.0), RTX 30xx / A40 (8.6), RTX 40xx / L40 / L4 (8.9), H100 / H200 (9.0) as cubins, plus
        # 9.0 PTX that the driver JIT-compiles for newer GPUs (Blackwell). TORCH_CUDA_ARCH_LIST overrides.
        # At run time unlearn_fast.ops.backend.cuda_ext_usable() probes whether a GPU got a kernel and
        # falls back to the reference ops (one warning) when it did not.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        ext = ce.CUDAExtension(
            "unlearn_fast._C",
            cpp + cu,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define + [("UNLEARN_FAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20"]},
        )
    else:
        ext = ce.CppExtension(
            "unlearn_fast._C",
            cpp,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define,
            extra_compile_args={"cxx": cxx},
        )
    return [ext], {"build_ext": ce.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["unlearn_fast", "unlearn_fast.*"]) + ["unlearn_fast.kernels", "unlearn_fast.recipe_files"],
    # recipes/*.yaml ship as package data (unlearn_fast.recipes finds them installed or in the checkout)
    package_dir={"unlearn_fast.kernels": "kernels", "unlearn_fast.recipe_files": "recipes"},
    package_data={"unlearn_fast.recipe_files": ["*.yaml"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
