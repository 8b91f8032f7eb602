"""Shared test helpers: the error rule for low-precision kernels, device and CPU-variant params."""
from __future__ import annotations

import os

import pytest
import torch

import exaone_ext

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CUDA = torch.cuda.is_available() and exaone_ext.build_info()["cuda"]
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
# Every CPU kernel variant this machine can run; the tests run each one.
CPU_ISAS = [i for i in ("avx512", "avx2", "scalar") if i in exaone_ext.build_info()["cpu_isa_compiled"]]
_BEST = exaone_ext.build_info()["cpu_isa_best"]
CPU_ISAS = CPU_ISAS[CPU_ISAS.index(_BEST):] if _BEST in CPU_ISAS else ["scalar"]


def assert_error_within(out: torch.Tensor, ref64: torch.Tensor, ref_same_dtype: torch.Tensor,
                        name: str = "output", factor: float = 2.0, floor: float | None = None) -> None:
    """The kernel's max error against a float64 reference must be at most `factor` times the error
    of plain PyTorch computing the same thing in the same dtype (plus a tiny floor for exact cases)."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert out.dtype == ref_same_dtype.dtype, f"{name}: dtype {out.dtype} != {ref_same_dtype.dtype}"
    ours = (out.double() - ref64.double()).abs().max().item() if out.numel() else 0.0
    theirs = (ref_same_dtype.double() - ref64.double()).abs().max().item() if out.numel() else 0.0
    if floor is None:
        floor = {torch.float64: 1e-12, torch.float32: 1e-6}.get(out.dtype, 1e-4)
    floor = floor * max(1.0, ref64.abs().max().item() if ref64.numel() else 1.0)
    assert ours <= factor * theirs + floor, (
        f"{name}: max error {ours:.3g} vs float64 reference exceeds {factor}x PyTorch's own "
        f"{out.dtype} error {theirs:.3g} (+{floor:.1g})")


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(params=CPU_ISAS)
def cpu_isa(request):
    """Runs a test once per CPU kernel variant (avx512 / avx2 / scalar where this CPU has them)."""
    before = exaone_ext.get_cpu_isa()
    exaone_ext.set_cpu_isa(request.param)
    yield request.param
    exaone_ext.set_cpu_isa(before)


# The elementwise kernels (SwiGLU, RMSNorm) also have an AVX512-BF16 variant that replaces avx512
# where the CPU has it; tests of those ops run it as one more variant and avx512 without it.
HAS_AVX512BF16 = ("avx512" in CPU_ISAS and "avx512bf16" in exaone_ext.build_info()["cpu_extra_kernels"]
                  and "avx512bf16" in exaone_ext.build_info()["cpu_features"])
CPU_VARIANTS = (["avx512bf16"] if HAS_AVX512BF16 else []) + CPU_ISAS


@pytest.fixture(params=CPU_VARIANTS)
def cpu_variant(request):
    """As cpu_isa, plus the AVX512-BF16 variant of the elementwise kernels ("avx512" runs without it)."""
    from exaone_ext import _C
    before_isa = exaone_ext.get_cpu_isa()
    before_bf16 = _C._set_cpu_avx512bf16(request.param == "avx512bf16")
    exaone_ext.set_cpu_isa("avx512" if request.param == "avx512bf16" else request.param)
    yield request.param
    exaone_ext.set_cpu_isa(before_isa)
    _C._set_cpu_avx512bf16(before_bf16)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
