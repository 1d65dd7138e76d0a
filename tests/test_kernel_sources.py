"""One way to address an operand: the CPU and CUDA kernels compute no element address of their own.

Every address in the kernels comes from csrc/fusion_args.h (``Operand::at``, ``FuseArgs::present``,
``FuseArgs::out_index``, ``dense_index``), which both backends share. The CPU tests then cover the
addressing the CUDA kernels use, and a stride mistake cannot hide in code only a GPU runs. This
test holds the kernel sources to that rule.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
# The kernels and their launch code (the host code that makes the operands, csrc/fusion_host.cpp,
# and the helpers' own header are the two places allowed to read strides).
KERNEL_SOURCES = sorted([CSRC / "fusion_math.h", CSRC / "dispatch.h",
                         *(p for p in (CSRC / "cpu").rglob("*") if p.suffix in (".cpp", ".h")),
                         *(p for p in (CSRC / "cuda").rglob("*") if p.suffix in (".cu", ".cpp", ".h"))])
# Address arithmetic: any stride, the mask read directly, or an index built from the call's extents
# (`x * a.d + y`, `(...) * a.n`).
FORBIDDEN = {
    "a stride": re.compile(r"stride"),
    "a direct mask read": re.compile(r"\bmask\s*\["),
    "an index built from the extents": re.compile(r"(\*\s*(a|args)\.[mnd]\b\s*\+)|(\)\s*\*\s*(a|args)\.[mnd]\b)"),
}


def code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, code) with // comments removed."""
    return [(number, line.split("//", 1)[0]) for number, line in enumerate(path.read_text().splitlines(), start=1)]


def address_arithmetic(path: Path) -> list[str]:
    """Each line of ``path`` that computes an address itself: "name:line: what: code"."""
    return [f"{path.name}:{number}: {what}: {code.strip()}"
            for number, code in code_lines(path) for what, pattern in FORBIDDEN.items() if pattern.search(code)]


def test_the_kernel_sources_are_found():
    names = {p.name for p in KERNEL_SOURCES}
    assert {"fusion_kernel.cpp", "fusion_cuda_kernels.cu", "fusion_math.h"} <= names


@pytest.mark.parametrize("path", KERNEL_SOURCES, ids=lambda p: str(p.relative_to(CSRC)))
def test_kernels_address_operands_only_through_fusion_args(path):
    found = address_arithmetic(path)
    assert not found, "address arithmetic outside csrc/fusion_args.h:\n" + "\n".join(found)


@pytest.mark.parametrize("line", [
    "  e.mu_[i] = to_acc(mu[i * a.mu.stride_m + n * a.mu.stride_n + d]);",
    "  return a.mask == nullptr || a.mask[i * a.mask_stride_m + n * a.mask_stride_n];",
    "  weights[(i * a.n + n) * a.d + d] = v;",
    "  partial[(row_slot * a.m + i) * columns + column] += v;",
    "  store_vec(joint_mu + n * a.d + d0, mu, count);",
])
def test_the_rule_catches_address_arithmetic(tmp_path, line):
    source = tmp_path / "kernel.cu"
    source.write_text(f"// a comment may say stride_d\n{line}\n  const int64_t points = a.n * a.d;\n")
    found = address_arithmetic(source)
    assert len(found) >= 1 and all(f.startswith("kernel.cu:2:") for f in found)
