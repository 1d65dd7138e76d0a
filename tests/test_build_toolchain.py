"""setup.py's check of the built extension: in a fresh process, one of its ops raises a C++ error,
which must arrive in Python as an exception. An extension that carries its own C++ runtime (a
toolchain that links libstdc++ statically) cannot hand its exceptions to torch, and the process
aborts instead; the build then stops, removes the library and names the compiler to use.

The aborting library is a real op library whose error escapes the C++ runtime's handlers, as it
does in such a build; each probe library compiles in a few seconds against torch's headers.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from setuptools.errors import PlatformError

ROOT = Path(__file__).resolve().parents[1]
BUILT = ROOT / "gpoe_fusion" / "_C.so"

# An op of the extension's name and schema whose C++ error either reaches torch's handler
# (PROBE_RAISES) or escapes every handler (a throw through noexcept ends in std::terminate, SIGABRT).
PROBE = r"""
#include <ATen/core/Tensor.h>
#include <torch/library.h>
#include <optional>
#include <tuple>

static void fail() {
#ifdef PROBE_RAISES
  TORCH_CHECK_VALUE(false, "fuse_forward: logvar: shape differs from mu's shape");
#else
  [&]() noexcept { TORCH_CHECK_VALUE(false, "fuse_forward: logvar: shape differs from mu's shape"); }();
#endif
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fuse_forward(const at::Tensor& mu, const at::Tensor&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool, bool) {
  fail();
  return {mu, mu, mu};
}

TORCH_LIBRARY(gpoe_fusion, m) {
  m.def("fuse_forward(Tensor mu, Tensor logvar, Tensor? logits, Tensor? mask, bool prior_expert, "
        "bool return_weights=False) -> (Tensor, Tensor, Tensor)");
  m.impl("fuse_forward", c10::DispatchKey::CPU, &fuse_forward);
}
"""


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    """{"raises": path, "aborts": path}: the probe library built both ways with the system g++."""
    if shutil.which("g++") is None:
        pytest.skip("no g++")
    folder = tmp_path_factory.mktemp("probe")
    source = folder / "probe.cpp"
    source.write_text(PROBE)
    include = Path(torch.__file__).parent / "include"
    lib = Path(torch.__file__).parent / "lib"
    built = {}
    for name, defines in (("raises", ["-DPROBE_RAISES"]), ("aborts", [])):
        target = folder / f"probe_{name}.so"
        subprocess.run(["g++", "-shared", "-fPIC", "-O0", "-g0", "-std=c++20", *defines, f"-I{include}",
                        str(source), "-o", str(target), f"-L{lib}", "-lc10", "-ltorch_cpu"], check=True)
        built[name] = target
    return built


def test_the_built_extension_raises_its_errors_in_python(setup_py, tmp_path, capsys):
    if not BUILT.is_file():
        pytest.skip("the extension is not built")
    library = tmp_path / "_C.so"
    shutil.copy(BUILT, library)
    setup_py.check_exceptions_reach_python(str(library))
    assert library.is_file()
    assert "reach Python as exceptions" in capsys.readouterr().err


def test_a_library_whose_errors_reach_python_passes(setup_py, probes):
    setup_py.check_exceptions_reach_python(str(probes["raises"]))
    assert probes["raises"].is_file()


def test_an_aborting_library_stops_the_build_naming_the_compiler(setup_py, probes, monkeypatch):
    monkeypatch.setenv("CXX", "/opt/gcc/bin/g++")
    with pytest.raises(PlatformError) as raised:
        setup_py.check_exceptions_reach_python(str(probes["aborts"]))
    message = str(raised.value)
    assert "aborted the process instead of" in message and "/opt/gcc/bin/g++" in message
    assert f"CXX={setup_py.SYSTEM_CXX} pip install --no-build-isolation -e ." in message
    assert not probes["aborts"].exists(), "a library that aborts on its first error must not stay installed"


def test_a_library_that_fails_otherwise_is_reported_with_its_error(setup_py, tmp_path):
    library = tmp_path / "not_a_library.so"
    library.write_text("not an ELF file")
    with pytest.raises(PlatformError, match=r"failed its check \(exit status 1\):\n(.|\n)*OSError"):
        setup_py.check_exceptions_reach_python(str(library))
    assert not library.exists()


@pytest.mark.parametrize("given, expected", [
    ("9.0", "sm_90"),
    ("9.0+PTX", "sm_90,compute_90"),
    ("8.0;8.6 9.0;12.0+PTX", "sm_80,sm_86,sm_90,sm_120,compute_120"),
])
def test_the_recorded_architectures_follow_the_arch_list(setup_py, given, expected):
    assert setup_py.cuda_arch_macro(given) == expected


def test_without_an_arch_list_the_build_follows_torch_and_adds_ptx(setup_py, monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75", "sm_80", "sm_90", "sm_100", "sm_120"])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert setup_py.cuda_arch_list(torch) == "7.5;8.0;9.0;10.0;12.0+PTX"
    # Visible GPUs decide, capped at the newest architecture torch was built for.
    capabilities = {0: (8, 6), 1: (8, 6), 2: (13, 0)}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: capabilities[i])
    assert setup_py.cuda_arch_list(torch) == "8.6;12.0+PTX"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert setup_py.cuda_arch_list(torch) == "9.0"


def test_nvcc_compiles_with_the_flags_of_a_build_for_several_architectures(setup_py, tmp_path):
    """nvcc splits a -D value at its commas: the architectures' macro would define sm_90 (and every other after
    the first) as 1, and CUDA's own headers, which name them, would not compile."""
    cuda_home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    nvcc = shutil.which("nvcc", path=os.path.join(cuda_home, "bin")) or shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc")
    macros, flags = setup_py.cuda_flags("8.0;9.0+PTX")
    assert any("sm_80,sm_90,compute_90" in flag for flag in flags["cxx"])
    source = tmp_path / "probe.cu"
    source.write_text("#include <nv/target>\n"
                      "__global__ void k(float* x) { NV_IF_TARGET(NV_PROVIDES_SM_90, (x[0] = 1.f;)); }\n")
    # As torch's BuildExtension hands them to nvcc: each macro as -DNAME[=VALUE], then the nvcc flags.
    defines = [f"-D{name}" if value is None else f"-D{name}={value}" for name, value in macros]
    proc = subprocess.run([nvcc, "-c", str(source), "-o", str(tmp_path / "probe.o"), *defines, *flags["nvcc"],
                           "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
