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

Before compiling, the build checks that its C++ toolchain links libstdc++ dynamically (see
``_ensure_shared_cxx_runtime``): otherwise C++ errors raised inside the ops could not reach Python.
"""

import glob
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from setuptools import setup
from setuptools.errors import CompileError, LinkError, PlatformError

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

# The compilers the build falls back to when the configured toolchain links libstdc++ statically
# (module attributes, so that tests can point them elsewhere).
SYSTEM_CC = "/usr/bin/gcc"
SYSTEM_CXX = "/usr/bin/g++"
# setuptools' unix compiler commands that start with the C / the C++ compiler driver. Recent
# setuptools compiles C++ with compiler_so_cxx and links it with compiler_cxx's driver followed by
# linker_so_cxx's arguments; older versions have no *_cxx commands but compiler_cxx, whose driver
# they put in front of linker_so's arguments.
C_COMMANDS = ("compiler", "compiler_so", "linker_so", "linker_exe")
CXX_COMMANDS = ("compiler_cxx", "compiler_so_cxx", "linker_so_cxx", "linker_exe_cxx")
# Compiler launchers that may precede the driver in CC / CXX.
LAUNCHERS = ("ccache", "sccache")
# A throw makes the object reference the C++ runtime's exception support (__cxa_throw), so a
# toolchain that links libstdc++ dynamically must list it among the NEEDED libraries, even
# under --as-needed.
PROBE_SOURCE = 'extern "C" int gpoe_fusion_toolchain_probe(int x) { if (x) throw x; return 0; }\n'


def _log(message: str) -> None:
    print(f"[gpoe_fusion build] {message}", file=sys.stderr)


# ---- The C++ runtime check ------------------------------------------------------------------------
# torch catches C++ exceptions (c10::Error) raised inside an operator with the libstdc++ it is
# linked against. An extension that carries its own static copy of libstdc++ throws with that copy,
# whose exception handling does not recognise torch's catch clauses: the exception escapes and
# the process aborts instead of raising in Python. Some toolchains (e.g. wrappers adding
# -static-libstdc++) do this silently, so the build probes the one it is about to use.


def _parse_elf_needed(data: bytes) -> list[str]:
    """The DT_NEEDED entries of an ELF file's dynamic section, read through its section headers
    (a linker's fresh output always has them). Raises ValueError if ``data`` is not such a file."""
    if len(data) < 52 or data[:4] != b"\x7fELF" or data[4] not in (1, 2) or data[5] not in (1, 2):
        raise ValueError("not an ELF file")
    is64, endian = data[4] == 2, "<" if data[5] == 1 else ">"
    if is64:
        shoff, = struct.unpack_from(endian + "Q", data, 0x28)
        shentsize, shnum = struct.unpack_from(endian + "HH", data, 0x3A)
        section, entry = endian + "IIQQQQIIQQ", endian + "qQ"
    else:
        shoff, = struct.unpack_from(endian + "I", data, 0x20)
        shentsize, shnum = struct.unpack_from(endian + "HH", data, 0x2E)
        section, entry = endian + "IIIIIIIIII", endian + "iI"
    if shoff == 0:
        raise ValueError("ELF file without section headers")
    # (type, offset, size, link) of every section; with 0xff00 or more sections e_shnum is 0 and the
    # count is the first section header's size.
    headers = [struct.unpack_from(section, data, shoff + i * shentsize) for i in range(shnum or 1)]
    if shnum == 0:
        headers = [struct.unpack_from(section, data, shoff + i * shentsize) for i in range(headers[0][5])]
    sections = [(h[1], h[4], h[5], h[6]) for h in headers]
    needed = []
    for kind, offset, size, link in sections:
        if kind != 6:  # SHT_DYNAMIC
            continue
        strtab = sections[link][1]
        for position in range(offset, offset + size, struct.calcsize(entry)):
            tag, value = struct.unpack_from(entry, data, position)
            if tag == 0:  # DT_NULL ends the table
                break
            if tag == 1:  # DT_NEEDED: an offset into the dynamic string table
                start = strtab + value
                needed.append(data[start:data.index(b"\0", start)].decode())
    return needed


def _readelf_needed(path: str) -> list[str]:
    """The NEEDED entries of ``path`` as ``readelf -d`` lists them."""
    listing = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True,
                             env={**os.environ, "LC_ALL": "C"}).stdout
    return re.findall(r"\(NEEDED\).*\[(.+)\]", listing)


def _elf_needed(path: str) -> list[str]:
    """The shared libraries ``path`` needs: ``readelf -d`` where binutils is installed, else
    read from the file itself."""
    if shutil.which("readelf"):
        try:
            return _readelf_needed(path)
        except (OSError, subprocess.CalledProcessError):
            pass
    with open(path, "rb") as f:
        return _parse_elf_needed(f.read())


def _links_libstdcxx_dynamically(needed: list[str]) -> bool:
    return any(name.startswith("libstdc++.so") for name in needed)


def _build_probe(compiler, build_dir: str, link_args=()) -> str:
    """Compile and link, with ``compiler`` (the build's own, so the very executables and flags of
    the real build), a shared object that throws a C++ exception; returns its path."""
    os.makedirs(build_dir, exist_ok=True)
    source = os.path.join(build_dir, "toolchain_probe.cpp")
    with open(source, "w") as f:
        f.write(PROBE_SOURCE)
    objects = compiler.compile([source], output_dir=build_dir, extra_postargs=[])
    library = os.path.join(build_dir, "toolchain_probe.so")
    if os.path.exists(library):  # the linker skips an output newer than its inputs: never judge an old one
        os.remove(library)
    compiler.link_shared_object(objects, library, extra_postargs=list(link_args), target_lang="c++")
    return library


def _driver_index(command: list[str]) -> int:
    """Where the compiler driver is in a command: after a launcher such as ccache."""
    return 1 if len(command) > 1 and os.path.basename(command[0]) in LAUNCHERS else 0


def _configured_cxx(compiler) -> str:
    """The C++ driver the build links with (and compiles with, without ninja)."""
    command = list(getattr(compiler, "compiler_cxx", None) or compiler.compiler_so)
    return command[_driver_index(command)]


def _use_toolchain(compiler, cc: str, cxx: str) -> dict:
    """Make ``compiler`` use the drivers ``cc`` and ``cxx``; returns what to restore. torch's
    BuildExtension compiles with $CXX under ninja and passes $CC to nvcc as its host compiler, so
    those follow too."""
    saved = {"env": {name: os.environ.get(name) for name in ("CC", "CXX")}, "commands": {}}
    for names, driver in ((C_COMMANDS, cc), (CXX_COMMANDS, cxx)):
        for name in names:
            command = getattr(compiler, name, None)
            if not command:
                continue
            saved["commands"][name] = list(command)
            command = list(command)
            command[_driver_index(command)] = driver
            compiler.set_executable(name, command)
    os.environ["CC"], os.environ["CXX"] = cc, cxx
    return saved


def _restore_toolchain(compiler, saved: dict) -> None:
    for name, command in saved["commands"].items():
        compiler.set_executable(name, command)
    for name, value in saved["env"].items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _static_runtime_message(configured: str, fallback: str) -> str:
    """Why the build stops (``fallback``: why SYSTEM_CXX cannot stand in) and what to set."""
    return (
        f"gpoe_fusion: the C++ toolchain of this build ({configured}) links libstdc++ statically, and\n"
        f"{fallback}. With its own copy of the C++ runtime in the extension, a C++ error raised inside\n"
        "the ops (a shape or dtype check) would abort the process instead of raising a Python exception,\n"
        "because torch catches it with its own runtime. Build with a compiler that links libstdc++\n"
        "dynamically (and without -static-libstdc++ in LDFLAGS), e.g.:\n"
        "  CC=/path/to/gcc CXX=/path/to/g++ pip install --no-build-isolation -e ."
    )


def _ensure_shared_cxx_runtime(compiler, build_dir: str, link_args=()) -> None:
    """Check that ``compiler`` links libstdc++ dynamically; if not, switch it to SYSTEM_CC /
    SYSTEM_CXX when they do, else raise PlatformError saying what to set."""
    if compiler.compiler_type != "unix" or sys.platform == "darwin":
        _log(f"toolchain check skipped: {sys.platform} does not build ELF shared objects")
        return
    configured = _configured_cxx(compiler)
    probe = _build_probe(compiler, os.path.join(build_dir, "configured"), link_args)
    with open(probe, "rb") as f:
        if f.read(4) != b"\x7fELF":
            _log(f"toolchain check skipped: {configured} does not build ELF shared objects")
            return
    needed = _elf_needed(probe)
    if _links_libstdcxx_dynamically(needed):
        _log(f"{configured} links libstdc++ dynamically (NEEDED: {', '.join(needed)})")
        return
    if not (os.path.exists(SYSTEM_CXX) and os.path.exists(SYSTEM_CC)):
        why = f"there is no {SYSTEM_CXX} and {SYSTEM_CC} to use instead"
        raise PlatformError(_static_runtime_message(configured, why))
    saved = _use_toolchain(compiler, SYSTEM_CC, SYSTEM_CXX)
    try:
        fallback = _elf_needed(_build_probe(compiler, os.path.join(build_dir, "system"), link_args))
        why = f"{SYSTEM_CXX} links it statically too"
    except (CompileError, LinkError, RuntimeError, OSError) as exc:
        fallback, why = [], f"{SYSTEM_CXX} failed to build a test library ({exc})"
    if _links_libstdcxx_dynamically(fallback):
        _log(f"{configured} links libstdc++ statically; using {SYSTEM_CXX} instead")
        return
    _restore_toolchain(compiler, saved)
    raise PlatformError(_static_runtime_message(configured, why))


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
            # Here torch's BuildExtension has set self.compiler up as every compile and the link
            # will use it, so the probe tests exactly that toolchain, before anything is compiled.
            _ensure_shared_cxx_runtime(self.compiler, os.path.join(self.build_temp, "toolchain_probe"),
                                       ext.extra_link_args or [])
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
