"""Builds the fused C++ (always) and CUDA (when possible) kernels as ``gpoe_fusion._C``.

Build with the torch you will run against already installed, without build isolation:

    pip install --no-build-isolation -e .

Environment switches:
    FORCE_CUDA=1            build the CUDA kernels even if this torch does not look CUDA-enabled
    GPOE_FUSION_NO_CUDA=1   never build the CUDA kernels
    TORCH_CUDA_ARCH_LIST    CUDA architectures (default "9.0": H100/H200)
    MAX_JOBS                parallel compile jobs

The CPU kernel (csrc/cpu/capability/fusion_kernel.cpp) is compiled once per x86 instruction set
(baseline, AVX2, AVX512) with that set's flags, as ATen compiles its own kernels, and the widest
one the machine (and ATen) uses is picked at run time; everything else is compiled for the
baseline, so the library runs on any x86-64 CPU.
"""

import glob
import os
import platform
import sys
from concurrent.futures import ThreadPoolExecutor

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CPU_KERNEL = os.path.join("csrc", "cpu", "capability", "fusion_kernel.cpp")
# Instruction sets of the CPU kernel copies: (name, compiler flags); the names are ATen's.
# DEFAULT comes first: the linker keeps the first copy of any inline function the copies
# share, and that copy must not use wider instructions than the machine may have.
X86_ISAS = [
    ("DEFAULT", []),
    ("AVX2", ["-mavx2", "-mfma", "-mf16c"]),
    # gcc 12 flags ATen's AVX512 intrinsics wrappers as reading uninitialised values (they are not).
    ("AVX512", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
                "-Wno-uninitialized", "-Wno-maybe-uninitialized"]),
]


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


def _isas() -> list[tuple[str, list[str]]]:
    if platform.machine().lower() in ("x86_64", "amd64"):
        return X86_ISAS
    return X86_ISAS[:1]


def _build_ext_class(base):
    """``base`` (torch's BuildExtension) plus the per-instruction-set copies of the CPU kernel."""

    class BuildExtensionWithIsaCopies(base):
        def build_extension(self, ext):
            # By now torch has added its own flags to ext.extra_compile_args; reuse them.
            cxx = ext.extra_compile_args["cxx"] if isinstance(ext.extra_compile_args, dict) else ext.extra_compile_args

            def compile_copy(isa):
                name, flags = isa
                _log(f"compiling the CPU kernel for {name}")
                return self.compiler.compile(
                    [CPU_KERNEL],
                    output_dir=os.path.join(self.build_temp, "isa", name.lower()),
                    macros=ext.define_macros,
                    include_dirs=ext.include_dirs,
                    extra_postargs=list(cxx) + flags + [f"-DCPU_CAPABILITY={name}", f"-DCPU_CAPABILITY_{name}"],
                )

            jobs = max(1, int(os.environ.get("MAX_JOBS", os.cpu_count() or 1)))
            with ThreadPoolExecutor(max_workers=min(jobs, len(_isas()))) as pool:
                copies = list(pool.map(compile_copy, _isas()))
            ext.extra_objects = [obj for objects in copies for obj in objects] + list(ext.extra_objects or [])
            super().build_extension(ext)

    return BuildExtensionWithIsaCopies


def _in_isolated_build_env() -> bool:
    """Whether this runs in the throw-away environment of pip's build isolation (pip puts its
    ``pip-build-env-*`` folder on sys.path; ``python -m build`` makes a ``build-env-*`` venv), which
    hides the packages installed in the environment the install was started from."""
    for entry in [sys.prefix, *sys.path]:
        for part in os.path.normpath(entry).split(os.sep):
            if part.startswith(("pip-build-env-", "build-env-")):
                return True
    return False


def _missing_torch_message(exc: ImportError) -> str:
    """What to do when ``import torch`` fails in this build (``exc``: why it failed)."""
    if _in_isolated_build_env():
        return (
            "gpoe_fusion: pip's build isolation hides the installed torch from this build (the kernels are\n"
            "compiled against the torch you run with, so torch is deliberately not a build requirement).\n"
            "Install without build isolation:\n"
            "  pip install --no-build-isolation -e .    (editable)\n"
            "  pip install --no-build-isolation .\n"
            "If torch is not installed yet, first: pip install torch==2.14.1 torchvision==0.29.1"
        )
    if isinstance(exc, ModuleNotFoundError) and exc.name == "torch":
        problem = "torch is not installed"
    else:
        problem = f"torch is installed but does not import ({type(exc).__name__}: {exc})"
    return (
        f"gpoe_fusion: {problem}; the kernels are compiled against it. Install torch, then this package:\n"
        "  pip install torch==2.14.1 torchvision==0.29.1\n"
        "  pip install --no-build-isolation -e ."
    )


def _extensions():
    cuda_home = _cuda_home()
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        sys.exit(_missing_torch_message(exc))

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    if not sources:
        _log("no C++ sources in csrc/: building the pure-Python package only")
        return [], {}

    # Decide from the torch build and the toolkit, never from torch.cuda.is_available(): build
    # machines have no GPU.
    force = os.environ.get("FORCE_CUDA") == "1"
    disabled = os.environ.get("GPOE_FUSION_NO_CUDA") == "1"
    with_cuda = bool(cuda_sources) and not disabled and (force or (torch.version.cuda is not None and cuda_home is not None))
    isas = _isas()
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        _log(f"building CPU ({', '.join(n for n, _ in isas)}) + CUDA kernels (torch {torch.__version__}, "
             f"CUDA_HOME={cuda_home}, TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})")
    else:
        reason = ("GPOE_FUSION_NO_CUDA=1" if disabled else
                  "torch has no CUDA" if torch.version.cuda is None else
                  "no CUDA toolkit found (set CUDA_HOME)" if cuda_home is None else "no CUDA sources")
        _log(f"building CPU kernels only ({', '.join(n for n, _ in isas)}; no CUDA: {reason})")

    # -g0 and narrow ATen headers keep the build short on small machines (docs/kernels.md).
    # No -std: torch's BuildExtension adds the standard its headers need (C++20 for torch 2.14).
    cxx_flags = ["-O3", "-g0", "-fopenmp", "-Wno-unknown-pragmas"]
    extra = {"cxx": cxx_flags}
    macros = [(f"GPOE_CPU_{name}", None) for name, _ in isas if name != "DEFAULT"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    # setuptools skips the build when no listed file is newer than the library.
    depends = sorted(glob.glob(os.path.join("csrc", "**", "*.h"), recursive=True)) + [CPU_KERNEL]
    if with_cuda:
        extra["nvcc"] = ["-O3", "-lineinfo"]
        ext = CUDAExtension("gpoe_fusion._C", sources + cuda_sources, include_dirs=include_dirs,
                            extra_compile_args=extra, define_macros=macros + [("WITH_CUDA", None)], depends=depends,
                            extra_link_args=["-fopenmp"], py_limited_api=True)
    else:
        ext = CppExtension("gpoe_fusion._C", sources, include_dirs=include_dirs, extra_compile_args=extra,
                           define_macros=macros, depends=depends, extra_link_args=["-fopenmp"], py_limited_api=True)
    build_ext = _build_ext_class(BuildExtension).with_options(no_python_abi_suffix=True)
    return [ext], {"build_ext": build_ext}


# setuptools' build backend (setuptools/build_meta.py) also runs this file with __name__ == "__main__";
# the guard only lets tests import the helpers above without building.
if __name__ == "__main__":
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
