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
        # Hopper is the target GPU; override with TORCH_CUDA_ARCH_LIST for others.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
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
    packages=find_packages(include=["unlearn_fast", "unlearn_fast.*"]) + ["unlearn_fast.kernels"],
    package_dir={"unlearn_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
