"""Builds the fused C++ (always) and CUDA (when possible) kernels as ``gpoe_fusion._C``.

Build with the torch you will run against already installed, without build isolation:

    pip install --no-build-isolation -e .

Environment switches:
    FORCE_CUDA=1            build the CUDA kernels even if this torch does not look CUDA-enabled
    GPOE_FUSION_NO_CUDA=1   never build the CUDA kernels
    TORCH_CUDA_ARCH_LIST    CUDA architectures (default "9.0": H100/H200)
    MAX_JOBS                parallel compile jobs
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(message: str) -> None:
    print(f"[gpoe_fusion build] {message}", file=sys.stderr)


def _cuda_home() -> str | None:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported, and /usr/local/bin/nvcc may be a
    # shim, so point it at the real toolkit before that import.
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
        return "/usr/local/cuda"
    return None


def _extensions():
    cuda_home = _cuda_home()
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        sys.exit(
            "gpoe_fusion: torch must be installed before building (the kernels are compiled against it).\n"
            "  pip install torch==2.14.1 torchvision==0.29.1\n"
            "  pip install --no-build-isolation -e ."
        )

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    if not sources:
        _log("no C++ sources in csrc/: building the pure-Python package only")
        return [], {}

    # Decide from the torch build and the toolkit, never from torch.cuda.is_available(): build
    # machines have no GPU.
    force = os.environ.get("FORCE_CUDA") == "1"
    disabled = os.environ.get("GPOE_FUSION_NO_CUDA") == "1"
    with_cuda = bool(cuda_sources) and not disabled and (force or (torch.version.cuda is not None and cuda_home is not None))
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        _log(f"building CPU + CUDA kernels (torch {torch.__version__}, CUDA_HOME={cuda_home}, "
             f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})")
    else:
        reason = ("GPOE_FUSION_NO_CUDA=1" if disabled else
                  "torch has no CUDA" if torch.version.cuda is None else
                  "no CUDA toolkit found (set CUDA_HOME)" if cuda_home is None else "no CUDA sources")
        _log(f"building CPU kernels only ({reason})")

    cxx_flags = ["-O3", "-g0", "-std=c++17", "-fopenmp"]
    extra = {"cxx": cxx_flags}
    macros = [("Py_LIMITED_API", "0x03090000")]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        extra["nvcc"] = ["-O3", "-std=c++17", "-lineinfo"]
        ext = CUDAExtension("gpoe_fusion._C", sources + cuda_sources, include_dirs=include_dirs,
                            extra_compile_args=extra, define_macros=macros + [("WITH_CUDA", None)],
                            extra_link_args=["-fopenmp"], py_limited_api=True)
    else:
        ext = CppExtension("gpoe_fusion._C", sources, include_dirs=include_dirs, extra_compile_args=extra,
                           define_macros=macros, extra_link_args=["-fopenmp"], py_limited_api=True)
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
