"""setup.py's C++ runtime check: before compiling, the build links a small throwing library with its
own toolchain and reads the library's NEEDED entries. Without libstdc++.so among them the extension
would carry its own C++ runtime, and C++ errors raised in the ops would abort the process instead of
reaching Python; the build then switches to the system g++ or stops with what to set.

Nothing here builds the extension: each probe compiles a one-line file.
"""

import glob
import os
import re
import shutil
import struct
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from setuptools.errors import PlatformError

ROOT = Path(__file__).resolve().parents[1]




@pytest.fixture(scope="module")
def system_gxx(setup_py):
    if not (os.path.exists(setup_py.SYSTEM_CXX) and os.path.exists(setup_py.SYSTEM_CC)):
        pytest.skip(f"no {setup_py.SYSTEM_CXX} and {setup_py.SYSTEM_CC}")
    return setup_py.SYSTEM_CC, setup_py.SYSTEM_CXX


@pytest.fixture(scope="module")
def static_gxx(system_gxx, tmp_path_factory):
    """A toolchain wrapper that links libstdc++ statically, as some compiler distributions' do."""
    wrapper = tmp_path_factory.mktemp("toolchain") / "static-g++"
    wrapper.write_text(f'#!/bin/sh\nexec {system_gxx[1]} -static-libstdc++ "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


@pytest.fixture
def clean_env(monkeypatch):
    """CC and CXX unset, and restored after the test (the check sets them when it switches)."""
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)


def make_compiler(cc: str, cxx: str):
    """setuptools' unix compiler with the drivers cc / cxx in every command, as a build sets it up."""
    from distutils.ccompiler import new_compiler  # setuptools' own distutils, imported with setup.py

    compiler = new_compiler(compiler="unix")
    commands = {"compiler": [cc], "compiler_so": [cc, "-fPIC"], "linker_so": [cc, "-shared"], "linker_exe": [cc],
                "compiler_cxx": [cxx], "compiler_so_cxx": [cxx, "-fPIC"], "linker_so_cxx": [cxx, "-shared"],
                "linker_exe_cxx": [cxx]}
    # Older setuptools has no *_cxx commands (it links C++ with compiler_cxx's driver).
    compiler.set_executables(**{k: v for k, v in commands.items() if k in compiler.executables})
    return compiler


def commands(compiler) -> dict:
    return {name: list(getattr(compiler, name)) for name in compiler.executables if getattr(compiler, name, None)}


def probe_needed(setup_py, compiler, build_dir) -> tuple[list[str], str]:
    library = setup_py._build_probe(compiler, str(build_dir))
    return setup_py._elf_needed(library), library


# ---- The probe and the NEEDED entries -------------------------------------------------------------

def test_system_gxx_links_libstdcxx_dynamically(setup_py, system_gxx, tmp_path):
    needed, library = probe_needed(setup_py, make_compiler(*system_gxx), tmp_path)
    assert setup_py._links_libstdcxx_dynamically(needed), needed
    assert setup_py._parse_elf_needed(Path(library).read_bytes()) == needed


def test_static_libstdcxx_wrapper_is_detected(setup_py, system_gxx, static_gxx, tmp_path):
    needed, library = probe_needed(setup_py, make_compiler(system_gxx[0], static_gxx), tmp_path)
    assert not setup_py._links_libstdcxx_dynamically(needed), needed
    assert any(name.startswith("libc.so") for name in needed), needed  # the entries were read, and libc is there
    assert setup_py._parse_elf_needed(Path(library).read_bytes()) == needed


def synthetic_elf(is64: bool, endian: str, needed: list[str]) -> bytes:
    """A minimal ELF file: header, .dynstr, .dynamic (a DT_SONAME first, then DT_NEEDED), and the
    three section headers (null, .dynstr, .dynamic)."""
    names = ["libself.so"] + needed
    strtab, offsets = b"\0", []
    for name in names:
        offsets.append(len(strtab))
        strtab += name.encode() + b"\0"
    entry = endian + ("qQ" if is64 else "iI")
    tags = [(14, offsets[0])] + [(1, offset) for offset in offsets[1:]] + [(0, 0)]
    dynamic = b"".join(struct.pack(entry, tag, value) for tag, value in tags)
    header_size = 64 if is64 else 52
    section = endian + ("IIQQQQIIQQ" if is64 else "IIIIIIIIII")
    strtab_at, dynamic_at = header_size, header_size + len(strtab)
    sections_at = dynamic_at + len(dynamic)
    headers = (struct.pack(section, *[0] * 10)
               + struct.pack(section, 0, 3, 0, 0, strtab_at, len(strtab), 0, 0, 1, 0)
               + struct.pack(section, 0, 6, 0, 0, dynamic_at, len(dynamic), 1, 0, 8, struct.calcsize(entry)))
    word = "Q" if is64 else "I"
    ident = b"\x7fELF" + bytes([2 if is64 else 1, 1 if endian == "<" else 2, 1]) + bytes(9)
    header = ident + struct.pack(endian + "HHI" + word * 3 + "IHHHHHH", 3, 62 if is64 else 3, 1, 0, 0, sections_at,
                                 0, header_size, 0, 0, struct.calcsize(section), 3, 0)
    assert len(header) == header_size
    return header + strtab + dynamic + headers


@pytest.mark.parametrize("is64", [True, False], ids=["elf64", "elf32"])
@pytest.mark.parametrize("endian", ["<", ">"], ids=["little", "big"])
def test_elf_parser_reads_every_class_and_byte_order(setup_py, is64, endian):
    needed = ["libstdc++.so.6", "libm.so.6", "libc.so.6"]
    assert setup_py._parse_elf_needed(synthetic_elf(is64, endian, needed)) == needed
    assert setup_py._parse_elf_needed(synthetic_elf(is64, endian, [])) == []


def test_elf_parser_refuses_other_files(setup_py):
    with pytest.raises(ValueError, match="not an ELF file"):
        setup_py._parse_elf_needed(b"\xcf\xfa\xed\xfe" + bytes(60))  # a Mach-O header
    with pytest.raises(ValueError, match="not an ELF file"):
        setup_py._parse_elf_needed(b"\x7fELF\x02\x01")  # cut short


def test_without_readelf_the_file_itself_is_read(setup_py, system_gxx, tmp_path, monkeypatch):
    library = setup_py._build_probe(make_compiler(*system_gxx), str(tmp_path))
    listed = setup_py._readelf_needed(library) if shutil.which("readelf") else None

    def no_readelf(path):
        raise AssertionError("readelf used where it is not installed")

    monkeypatch.setattr(setup_py.shutil, "which", lambda name: None)
    monkeypatch.setattr(setup_py, "_readelf_needed", no_readelf)
    needed = setup_py._elf_needed(library)
    assert setup_py._links_libstdcxx_dynamically(needed), needed
    if listed is not None:
        assert needed == listed


def test_built_extension_links_libstdcxx_dynamically(setup_py):
    """The extension in the package was linked against the shared C++ runtime (what the check is for)."""
    libraries = glob.glob(str(ROOT / "gpoe_fusion" / "_C*.so"))
    if not libraries:
        pytest.skip("extension not built")
    for library in libraries:
        needed = setup_py._elf_needed(library)
        assert setup_py._links_libstdcxx_dynamically(needed), f"{library}: NEEDED {needed}"


# ---- The choice of toolchain ----------------------------------------------------------------------

def test_dynamic_toolchain_is_kept(setup_py, system_gxx, tmp_path, capsys, clean_env):
    compiler = make_compiler(*system_gxx)
    before = commands(compiler)
    setup_py._ensure_shared_cxx_runtime(compiler, str(tmp_path))
    assert commands(compiler) == before
    assert "CXX" not in os.environ and "CC" not in os.environ
    assert f"{system_gxx[1]} links libstdc++ dynamically" in capsys.readouterr().err


def test_static_toolchain_is_replaced_by_the_system_gxx(setup_py, system_gxx, static_gxx, tmp_path, capsys,
                                                        clean_env):
    compiler = make_compiler(system_gxx[0], static_gxx)
    setup_py._ensure_shared_cxx_runtime(compiler, str(tmp_path), ["-fopenmp"])
    assert f"[gpoe_fusion build] {static_gxx} links libstdc++ statically; using {system_gxx[1]} instead" \
        in capsys.readouterr().err
    after = commands(compiler)
    for name in setup_py.CXX_COMMANDS:
        if name in after:
            assert after[name][0] == system_gxx[1], (name, after[name])
    assert after.get("linker_so_cxx", ["", "-shared"])[1:] == ["-shared"]  # the arguments are kept
    # torch's ninja compile reads $CXX, nvcc's host compiler is $CC: both follow.
    assert (os.environ["CC"], os.environ["CXX"]) == system_gxx
    # The switched compiler object now builds with the shared runtime.
    needed, _ = probe_needed(setup_py, compiler, tmp_path / "after")
    assert setup_py._links_libstdcxx_dynamically(needed), needed


def test_no_system_compiler_stops_the_build_with_what_to_set(setup_py, system_gxx, static_gxx, tmp_path,
                                                             monkeypatch, clean_env):
    missing = str(tmp_path / "bin" / "g++")
    monkeypatch.setattr(setup_py, "SYSTEM_CXX", missing)
    compiler = make_compiler(system_gxx[0], static_gxx)
    before = commands(compiler)
    with pytest.raises(PlatformError) as raised:
        setup_py._ensure_shared_cxx_runtime(compiler, str(tmp_path))
    message = str(raised.value)
    assert f"({static_gxx}) links libstdc++ statically" in message
    assert "abort the process instead of raising a Python exception" in message
    assert f"there is no {missing}" in message
    assert "CC=/path/to/gcc CXX=/path/to/g++ pip install --no-build-isolation -e ." in message
    assert commands(compiler) == before and "CXX" not in os.environ


def test_static_system_compiler_is_refused_and_the_toolchain_restored(setup_py, system_gxx, static_gxx, tmp_path,
                                                                      monkeypatch, clean_env):
    monkeypatch.setattr(setup_py, "SYSTEM_CXX", static_gxx)
    compiler = make_compiler(system_gxx[0], static_gxx)
    before = commands(compiler)
    with pytest.raises(PlatformError, match=re.escape(f"{static_gxx} links it statically too")):
        setup_py._ensure_shared_cxx_runtime(compiler, str(tmp_path))
    assert commands(compiler) == before
    assert "CC" not in os.environ and "CXX" not in os.environ


def test_check_is_skipped_where_libraries_are_not_elf(setup_py, system_gxx, tmp_path, monkeypatch, capsys):
    compiler = make_compiler(*system_gxx)

    def compile_nothing(*args, **kwargs):
        raise AssertionError("probed on a platform without ELF libraries")

    monkeypatch.setattr(compiler, "compile", compile_nothing)
    monkeypatch.setattr(sys, "platform", "darwin")
    setup_py._ensure_shared_cxx_runtime(compiler, str(tmp_path))
    assert "toolchain check skipped: darwin" in capsys.readouterr().err


def test_build_extension_checks_the_toolchain_before_compiling(setup_py, tmp_path, monkeypatch):
    """The check runs with the build's own compiler object, before the CPU kernel copies compile."""
    calls = []

    class TorchBuildExtension:  # stands in for torch's BuildExtension: records the final build
        def build_extension(self, ext):
            calls.append("link")

    builder = setup_py._build_ext_class(TorchBuildExtension)()
    builder.build_temp = str(tmp_path)
    builder.compiler = SimpleNamespace(compile=lambda sources, **kwargs: calls.append("compile") or [])
    ext = SimpleNamespace(extra_compile_args={"cxx": ["-O3"]}, extra_link_args=["-fopenmp"], define_macros=[],
                          include_dirs=[], extra_objects=[])
    monkeypatch.setattr(setup_py, "_ensure_shared_cxx_runtime",
                        lambda compiler, build_dir, link_args: calls.append(("check", compiler, build_dir, link_args)))
    builder.build_extension(ext)
    assert calls[0] == ("check", builder.compiler, os.path.join(str(tmp_path), "toolchain_probe"), ["-fopenmp"])
    assert calls[1:] == ["compile"] * len(setup_py._isas()) + ["link"]


@pytest.mark.parametrize("use_ninja", [True, False], ids=["ninja", "no-ninja"])
def test_torch_build_with_a_static_toolchain_links_the_shared_runtime(setup_py, system_gxx, static_gxx, tmp_path,
                                                                      monkeypatch, capsys, clean_env, use_ninja):
    """A small extension built by setup.py's build command (torch's BuildExtension: ninja or
    setuptools compiling) with CXX set to the static wrapper comes out linked to libstdc++.so."""
    from setuptools import Distribution, Extension
    from torch.utils.cpp_extension import BuildExtension

    source = tmp_path / "tiny.cpp"
    source.write_text('extern "C" int tiny(int x) { if (x) throw x; return 0; }\n')
    # The CPU kernel copy compiles a one-line file instead of the real kernel (which takes minutes).
    kernel = tmp_path / "kernel.cpp"
    kernel.write_text("int kernel_copy() { return 1; }\n")
    monkeypatch.setattr(setup_py, "CPU_KERNEL", str(kernel))
    monkeypatch.setattr(setup_py, "_isas", lambda: [("DEFAULT", [])])
    monkeypatch.setenv("CC", system_gxx[0])
    monkeypatch.setenv("CXX", static_gxx)
    build_ext = setup_py._build_ext_class(BuildExtension).with_options(use_ninja=use_ninja)
    dist = Distribution({"name": "tiny", "ext_modules": [Extension("tiny", [str(source)], extra_compile_args=[])],
                         "cmdclass": {"build_ext": build_ext}})
    command = dist.get_command_obj("build_ext")
    command.build_lib, command.build_temp = str(tmp_path / "lib"), str(tmp_path / "temp")
    command.ensure_finalized()
    command.run()
    assert f"{static_gxx} links libstdc++ statically; using {system_gxx[1]} instead" in capsys.readouterr().err
    (library,) = glob.glob(str(tmp_path / "lib" / "tiny*.so"))
    needed = setup_py._elf_needed(library)
    assert setup_py._links_libstdcxx_dynamically(needed), needed
