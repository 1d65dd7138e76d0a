"""Builds the fused C++ (always) and CUDA (when possible) kernels as ``gpoe_fusion._C`` against the installed torch:
``pip install --no-build-isolation -e .``. Switches: FORCE_CUDA=1, GPOE_FUSION_NO_CUDA=1, TORCH_CUDA_ARCH_LIST
(``cuda_arch_list``), MAX_JOBS. The CPU kernel is compiled once per x86 instruction set, as ATen compiles its own, and
picked at run time. The built library must raise a C++ error into Python in a fresh process; a toolchain linking
libstdc++ statically aborts instead, and the build names the compiler to use (docs/kernels.md).
"""

import glob
import os
import platform
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from setuptools import setup
from setuptools.errors import PlatformError

ROOT = os.path.dirname(os.path.abspath(__file__))
CPU_KERNEL = os.path.join("csrc", "cpu", "capability", "fusion_kernel.cpp")
# Instruction sets of the CPU kernel copies: (ATen's name, compiler flags). DEFAULT comes first: the linker keeps the
# first copy of any inline function the copies share, which must not use wider instructions than the machine has.
X86_ISAS = [
    ("DEFAULT", []),
    ("AVX2", ["-mavx2", "-mfma", "-mf16c"]),
    # gcc 12 flags ATen's AVX512 intrinsics wrappers as reading uninitialised values (they are not).
    ("AVX512", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
                "-Wno-uninitialized", "-Wno-maybe-uninitialized"]),
]
# The compiler to name when the configured one links libstdc++ statically.
SYSTEM_CXX = "/usr/bin/g++"
# Run in a fresh process against the built library: an op's shape check must raise in Python.
EXCEPTION_CHECK = """
import sys, torch
torch.ops.load_library(sys.argv[1])
try:
    torch.ops.gpoe_fusion.fuse_forward(torch.zeros(1, 1, 1), torch.zeros(2, 1, 1), None, None, False)
except ValueError:
    sys.exit(0)
sys.exit("the op accepted a logvar of the wrong shape")
"""


def _log(message: str) -> None:
    print(f"[gpoe_fusion build] {message}", file=sys.stderr)


def check_exceptions_reach_python(library: str, script: str = EXCEPTION_CHECK) -> None:
    """Raise PlatformError (and remove ``library``) unless a C++ error raised in one of its ops reaches Python as an
    exception, checked by running ``script`` with ``library`` in a fresh process."""
    proc = subprocess.run([sys.executable, "-c", script, library], capture_output=True, text=True)
    if proc.returncode == 0:
        _log(f"C++ errors in {os.path.basename(library)} reach Python as exceptions")
        return
    os.remove(library)  # a library that aborts on its first error must not stay installed
    if proc.returncode == -signal.SIGABRT:
        cxx = os.environ.get("CXX", "the default c++")
        raise PlatformError(
            f"gpoe_fusion: a C++ error raised inside the freshly built {library} aborted the process instead of\n"
            f"reaching Python. The compiler ({cxx}) links libstdc++ statically, so the extension carries its own C++\n"
            "runtime, whose exceptions torch cannot catch: every shape or dtype error would kill the program.\n"
            "Build with a compiler that links libstdc++ dynamically (and without -static-libstdc++ in LDFLAGS), e.g.:\n"
            f"  CC=/usr/bin/gcc CXX={SYSTEM_CXX} pip install --no-build-isolation -e .")
    raise PlatformError(f"gpoe_fusion: the built {library} failed its check (exit status {proc.returncode}):\n"
                        f"{proc.stderr.strip()}")


def _cuda_home() -> str | None:
    # torch.utils.cpp_extension reads CUDA_HOME when imported, and /usr/local/bin/nvcc may be a shim: point it at the
    # real toolkit before that import.
    if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    return os.environ.get("CUDA_HOME") or None


def cuda_arch_list(torch) -> str:
    """TORCH_CUDA_ARCH_LIST if set; else the visible GPUs' architectures (capped at the newest this torch was built for,
    as torch's own default is), or with no GPU visible every architecture this torch was built for; PTX of the newest
    added, so that a newer GPU compiles it when loading."""
    given = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if given and given != "native":
        return given
    built = sorted({(int(a[3:-1]), int(a[-1])) for a in torch.cuda.get_arch_list() if a.startswith("sm_")})
    visible = {min(torch.cuda.get_device_capability(i), built[-1] if built else (99, 9))
               for i in range(torch.cuda.device_count())}
    archs = [f"{major}.{minor}" for major, minor in sorted(visible or built)]
    if not archs:
        raise PlatformError("gpoe_fusion: this torch names no CUDA architecture; set TORCH_CUDA_ARCH_LIST, e.g. 9.0")
    return ";".join(archs[:-1] + [archs[-1] + "+PTX"])


def cuda_arch_macro(arch_list: str) -> str:
    """The architectures of a TORCH_CUDA_ARCH_LIST as the extension records them (GPOE_CUDA_ARCHS): machine code
    "sm_XY" for each, and "compute_XY" (PTX) for those with +PTX; comma-separated."""
    names = []
    for arch in filter(None, arch_list.replace(" ", ";").split(";")):
        number = arch.removesuffix("+PTX").replace(".", "")
        names += [f"sm_{number}"] + ([f"compute_{number}"] if arch.endswith("+PTX") else [])
    return ",".join(names)


def cuda_flags(arch_list: str) -> tuple[list[tuple[str, str | None]], dict[str, list[str]]]:
    """What a CUDA build for ``arch_list`` adds: the macros every compiler gets, and the flags per compiler.
    GPOE_CUDA_ARCHS goes to the C++ compiler only (ops.cpp reports it): nvcc splits a -D value at its commas and
    defines each architecture after the first as a macro of its own (sm_90 as 1), which breaks CUDA's headers."""
    return [("WITH_CUDA", None)], {"cxx": [f"-DGPOE_CUDA_ARCHS={cuda_arch_macro(arch_list)}"],
                                   "nvcc": ["-O3", "-lineinfo"]}


def _isas() -> list[tuple[str, list[str]]]:
    return X86_ISAS if platform.machine().lower() in ("x86_64", "amd64") else X86_ISAS[:1]


def _build_ext_class(base):
    """``base`` (torch's BuildExtension) plus the CPU kernel's per-instruction-set copies and the exception check."""

    class BuildExtensionWithIsaCopies(base):
        def build_extension(self, ext):
            # By now torch has added its own flags to ext.extra_compile_args; reuse them.
            cxx = ext.extra_compile_args["cxx"] if isinstance(ext.extra_compile_args, dict) else ext.extra_compile_args

            def compile_copy(isa):
                name, flags = isa
                _log(f"compiling the CPU kernel for {name}")
                return self.compiler.compile(
                    [CPU_KERNEL], output_dir=os.path.join(self.build_temp, "isa", name.lower()),
                    macros=ext.define_macros, include_dirs=ext.include_dirs,
                    extra_postargs=list(cxx) + flags + [f"-DCPU_CAPABILITY={name}", f"-DCPU_CAPABILITY_{name}"])

            jobs = max(1, int(os.environ.get("MAX_JOBS", os.cpu_count() or 1)))
            with ThreadPoolExecutor(max_workers=min(jobs, len(_isas()))) as pool:
                copies = list(pool.map(compile_copy, _isas()))
            ext.extra_objects = [obj for objects in copies for obj in objects] + list(ext.extra_objects or [])
            super().build_extension(ext)
            check_exceptions_reach_python(self.get_ext_fullpath(ext.name))

    return BuildExtensionWithIsaCopies


def _in_isolated_build_env() -> bool:
    """Whether this runs in the throw-away environment of build isolation, which hides the installed packages (pip puts
    its ``pip-build-env-*`` folder on sys.path; ``python -m build`` makes a ``build-env-*`` venv)."""
    parts = (part for entry in [sys.prefix, *sys.path] for part in os.path.normpath(entry).split(os.sep))
    return any(part.startswith(("pip-build-env-", "build-env-")) for part in parts)


def _missing_torch_message(exc: ImportError) -> str:
    """What to do when ``import torch`` fails in this build (``exc``: why it failed)."""
    if _in_isolated_build_env():
        return ("gpoe_fusion: pip's build isolation hides the installed torch from this build (the kernels are\n"
                "compiled against the torch you run with, so torch is deliberately not a build requirement).\n"
                "Install without build isolation:\n"
                "  pip install --no-build-isolation -e .    (editable)\n"
                "  pip install --no-build-isolation .\n"
                "If torch is not installed yet, first: pip install torch==2.14.1 torchvision==0.29.1")
    missing = isinstance(exc, ModuleNotFoundError) and exc.name == "torch"
    problem = "torch is not installed" if missing else f"torch is installed but does not import ({type(exc).__name__}: {exc})"
    return (f"gpoe_fusion: {problem}; the kernels are compiled against it. Install torch, then this package:\n"
            "  pip install torch==2.14.1 torchvision==0.29.1\n"
            "  pip install --no-build-isolation -e .")


def _extensions():
    cuda_home = _cuda_home()
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        sys.exit(_missing_torch_message(exc))

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    # Decide from the torch build and the toolkit, never from torch.cuda.is_available(): build machines have no GPU.
    force = os.environ.get("FORCE_CUDA") == "1"
    disabled = os.environ.get("GPOE_FUSION_NO_CUDA") == "1"
    with_cuda = bool(cuda_sources) and not disabled and (force or (torch.version.cuda is not None and cuda_home is not None))
    isas = ", ".join(name for name, _ in _isas())
    # -g0 and narrow ATen headers keep the build short on small machines (docs/kernels.md).
    # No -std: torch's BuildExtension adds the standard its headers need (C++20 for torch 2.14).
    extra = {"cxx": ["-O3", "-g0", "-fopenmp", "-Wno-unknown-pragmas"]}
    macros = [(f"GPOE_CPU_{name}", None) for name, _ in _isas() if name != "DEFAULT"]
    options = dict(include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=["-fopenmp"], py_limited_api=True,
                   # setuptools skips the build when no listed file is newer than the library.
                   depends=sorted(glob.glob(os.path.join("csrc", "**", "*.h"), recursive=True)) + [CPU_KERNEL])
    if with_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list = cuda_arch_list(torch)
        _log(f"building CPU ({isas}) + CUDA kernels (torch {torch.__version__}, CUDA_HOME={cuda_home}, "
             f"TORCH_CUDA_ARCH_LIST={arch_list})")
        cuda_macros, flags = cuda_flags(arch_list)
        macros += cuda_macros
        extra = {"cxx": extra["cxx"] + flags["cxx"], "nvcc": flags["nvcc"]}
        ext = CUDAExtension("gpoe_fusion._C", sources + cuda_sources, extra_compile_args=extra, define_macros=macros,
                            **options)
    else:
        reason = ("GPOE_FUSION_NO_CUDA=1" if disabled else "torch has no CUDA" if torch.version.cuda is None else
                  "no CUDA toolkit found (set CUDA_HOME)" if cuda_home is None else "no CUDA sources")
        _log(f"building CPU kernels only ({isas}; no CUDA: {reason})")
        ext = CppExtension("gpoe_fusion._C", sources, extra_compile_args=extra, define_macros=macros, **options)
    return [ext], {"build_ext": _build_ext_class(BuildExtension).with_options(no_python_abi_suffix=True)}


# setuptools' build backend also runs this file as __main__; the guard lets tests import the helpers.
if __name__ == "__main__":
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
