import os

import pytest
import torch
import torch.nn.functional as F

import exaone_ext
from exaone_ext import ops
from exaone_ext.ops import reference
from conftest import CUDA, DEVICES, DTYPES, HAS_AVX512BF16, assert_error_within

SHAPES = [(1, 7), (3, 17), (17, 80), (1000, 96), (2, 5, 1001)]


def _ref64(g, u):
    return F.silu(g.double()) * u.double()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", [False, True])
def test_forward_backward_matches_reference(shape, dtype, fused, device, cpu_variant):
    g = torch.randn(shape, device=device).mul_(3).to(dtype).requires_grad_()
    u = torch.randn(shape, device=device).to(dtype).requires_grad_()
    dy = torch.randn(shape, device=device).to(dtype)
    if fused:
        gu = torch.cat([g.detach(), u.detach()], -1).requires_grad_()
        out = ops.swiglu(gu)
        out.backward(dy)
        dg, du = gu.grad.chunk(2, -1)
    else:
        out = ops.swiglu(g, u)
        out.backward(dy)
        dg, du = g.grad, u.grad
    g64, u64 = g.detach().double().requires_grad_(), u.detach().double().requires_grad_()
    ref64 = _ref64(g64, u64)
    ref64.backward(dy.double())
    gl, ul = g.detach().clone().requires_grad_(), u.detach().clone().requires_grad_()
    ref_lp = reference.swiglu(gl, ul)
    ref_lp.backward(dy)
    assert_error_within(out, ref64, ref_lp, "out")
    assert_error_within(dg, g64.grad, gl.grad, "dgate")
    assert_error_within(du, u64.grad, ul.grad, "dup")


def test_non_contiguous_inputs(device, cpu_variant):
    base = torch.randn(40, 2, 130, device=device)
    g = base[:, 0, 1:98]          # strided rows, offset start
    u = torch.randn(97, 40, device=device).t()  # transposed: last dim not contiguous
    out = ops.swiglu(g, u)
    torch.testing.assert_close(out, F.silu(g) * u)
    gu = torch.randn(6, 3, 2 * 33, device=device).transpose(0, 1)
    torch.testing.assert_close(ops.swiglu(gu), reference.swiglu(gu))


def test_special_values(cpu_variant):
    g = torch.tensor([0.0, -0.0, 1e-30, 80.0, -80.0, 100.0, -100.0, float("inf"), float("nan")] * 3)
    u = torch.ones_like(g)
    out = ops.swiglu(g, u)
    ref = F.silu(g.double()).float()
    torch.testing.assert_close(out[:-1 - 8], ref[:-1 - 8], equal_nan=True)
    assert torch.isnan(out[8]) and torch.isnan(out[-1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_over_the_whole_range(dtype, cpu_variant):
    """bf16 / f16 results take a cheaper exponential: checked over and beyond the range where sigmoid
    is neither 0 nor 1, with infinities and NaN, forward and backward."""
    g = torch.cat([torch.linspace(-120, 120, 4001), torch.tensor([0.0, -0.0, float("inf"), float("nan")])])
    g = g.to(dtype)
    u = torch.randn(g.shape).to(dtype)
    dy = torch.randn(g.shape).to(dtype)
    finite = torch.isfinite(g)
    gg, uu = g.clone().requires_grad_(), u.clone().requires_grad_()
    out = ops.swiglu(gg, uu)
    out.backward(dy)
    g64, u64 = g.double().requires_grad_(), u.double().requires_grad_()
    ref64 = _ref64(g64, u64)
    ref64.backward(dy.double())
    gl, ul = g.clone().requires_grad_(), u.clone().requires_grad_()
    ref_lp = reference.swiglu(gl, ul)
    ref_lp.backward(dy)
    assert_error_within(out[finite], ref64[finite], ref_lp[finite], "out")
    assert_error_within(gg.grad[finite], g64.grad[finite], gl.grad[finite], "dgate")
    assert_error_within(uu.grad[finite], u64.grad[finite], ul.grad[finite], "dup")
    assert torch.isnan(out[-1]) and torch.isnan(gg.grad[-1]) and torch.isnan(uu.grad[-1])
    assert out[-2] == ref64[-2]  # silu(inf) * u = inf * u


@pytest.mark.skipif(not HAS_AVX512BF16, reason="no AVX512-BF16 variant on this CPU / build")
@pytest.mark.parametrize("fused", [False, True])
def test_avx512bf16_variant_rounds_as_avx512(fused):
    """vcvtneps2bf16 rounds to nearest even as our own conversion does: the same bits, forward and
    backward; only float32 denormal results (below 2^-126) become zeros."""
    from exaone_ext import _C
    g = (torch.randn(37, 1001) * 4).bfloat16()
    u = torch.randn(37, 1001).bfloat16()
    dy = torch.randn(37, 1001).bfloat16()
    u[0, :8] = 1e-39  # silu(g) * u below 2^-126
    g[0, :8] = 3.0
    g[1, 0], u[1, 1] = float("nan"), float("inf")

    def run():
        if fused:
            gu = torch.cat([g, u], -1)
            return ops.swiglu(gu), torch.ops.exaone_ext.swiglu_fused_backward(dy, gu)
        return ops.swiglu(g, u), torch.cat(torch.ops.exaone_ext.swiglu_backward(dy, g, u), -1)

    before_isa = exaone_ext.get_cpu_isa()
    exaone_ext.set_cpu_isa("avx512")
    before = _C._set_cpu_avx512bf16(True)
    try:
        assert exaone_ext.build_info()["cpu_avx512bf16_active"]
        out_bf16, grads_bf16 = run()
        _C._set_cpu_avx512bf16(False)
        assert not exaone_ext.build_info()["cpu_avx512bf16_active"]
        out, grads = run()
    finally:
        _C._set_cpu_avx512bf16(before)
        exaone_ext.set_cpu_isa(before_isa)
    assert out_bf16[0, :8].eq(0).all() and (out[0, :8].float().abs() > 0).all()
    assert (out_bf16[0, :8].float() - out[0, :8].float()).abs().max() < 2.0**-126
    torch.testing.assert_close(out_bf16[1:], out[1:], rtol=0, atol=0, equal_nan=True)
    assert (grads_bf16[0].float() - grads[0].float()).abs().max() < 2.0**-126
    torch.testing.assert_close(grads_bf16[1:], grads[1:], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_outputs(dtype):
    """Outputs of 4 MiB and more come from huge-page mappings kept for reuse on CPU: the values are
    right, a freed output's block serves the next output of its size, and the storage can be
    resized like any other."""
    cols = (32 << 20) // (2048 * torch.empty((), dtype=dtype).element_size())
    g = torch.randn(2048, cols).to(dtype)
    u = torch.randn(2048, cols).to(dtype)
    out = ops.swiglu(g, u)
    assert out.is_contiguous() and out.shape == g.shape
    ref = reference.swiglu(g[:64], u[:64])
    assert_error_within(out[:64], _ref64(g[:64], u[:64]), ref, "out")
    assert_error_within(out[-64:], _ref64(g[-64:], u[-64:]), reference.swiglu(g[-64:], u[-64:]), "out")
    dg, du = torch.ops.exaone_ext.swiglu_backward(u, g, u)
    assert_error_within(du[-64:], u[-64:].double() * F.silu(g[-64:].double()), u[-64:] * F.silu(g[-64:]), "dup")
    ptr = out.data_ptr()
    del out
    out = ops.swiglu(g, u)
    if "EXAONE_EXT_CPU_OUTPUT_CACHE_MB" not in os.environ:
        assert out.data_ptr() == ptr  # the freed block, already mapped
    assert_error_within(out[-64:], _ref64(g[-64:], u[-64:]), reference.swiglu(g[-64:], u[-64:]), "out")
    kept = out[-3:].clone()
    out.resize_(2049, cols)  # grows: the data moves into memory from torch's allocator
    assert torch.equal(out[-4:-1], kept)
    del out, dg, du


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty(dtype, device):
    g = torch.empty(0, 64, dtype=dtype, device=device)
    assert ops.swiglu(g, g).shape == (0, 64)
    assert ops.swiglu(torch.empty(3, 0, dtype=dtype, device=device)).shape == (3, 0)


def test_gradcheck_float64(cpu_isa):
    g = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    u = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.swiglu, (g, u))
    gu = torch.randn(2, 3, 14, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.swiglu(t), (gu,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype, device):
    g = torch.randn(5, 24, dtype=dtype, device=device, requires_grad=True)
    u = torch.randn(5, 24, dtype=dtype, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.exaone_ext.swiglu.default, (g, u))
    torch.library.opcheck(torch.ops.exaone_ext.swiglu_fused.default, (torch.cat([g, u], -1).detach().requires_grad_(),))
    dy = torch.randn(5, 24, dtype=dtype, device=device)
    torch.library.opcheck(torch.ops.exaone_ext.swiglu_backward.default, (dy, g.detach(), u.detach()))
    torch.library.opcheck(torch.ops.exaone_ext.swiglu_fused_backward.default, (dy, torch.cat([g, u], -1).detach()))


def test_bad_inputs():
    g = torch.randn(4, 8)
    with pytest.raises(ValueError, match="'up' must have the same shape as 'gate'"):
        ops.swiglu(g, torch.randn(4, 9))
    with pytest.raises(TypeError, match="'up' must have the same dtype as 'gate'"):
        ops.swiglu(g, torch.randn(4, 8, dtype=torch.float16))
    with pytest.raises(TypeError, match="'gate' must be float32, bfloat16 or float16"):
        ops.swiglu(torch.ones(4, 8, dtype=torch.int32), torch.ones(4, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="must be even"):
        ops.swiglu(torch.randn(4, 7))
    with pytest.raises(TypeError, match="'up' must be a torch.Tensor"):
        ops.swiglu(g, [1.0])
    with pytest.raises(ValueError, match="at least 1 dimension"):
        ops.swiglu(torch.tensor(1.0), torch.tensor(2.0))
    if CUDA:
        with pytest.raises(ValueError, match="same device"):
            ops.swiglu(g, g.cuda())


def test_reference_used_without_kernel(no_kernel):
    """A device without kernels runs the reference: no exaone_ext op dispatched, the reference's
    results and gradients."""
    g, u = torch.randn(3, 8, requires_grad=True), torch.randn(3, 8)
    with no_kernel() as seen:
        out = ops.swiglu(g, u)
        out.sum().backward()
        gu = torch.cat([g.detach(), u], -1)
        fused = ops.swiglu(gu)
    assert seen == set()
    assert torch.equal(out, reference.swiglu(g, u)) and torch.equal(fused, reference.swiglu(gu))
    g2 = g.detach().clone().requires_grad_()
    reference.swiglu(g2, u).sum().backward()
    assert torch.equal(g.grad, g2.grad)


def test_meta_device_traces():
    g = torch.empty(3, 8, device="meta")
    assert ops.swiglu(g, g).shape == (3, 8)
    assert ops.swiglu(torch.empty(3, 16, device="meta")).shape == (3, 8)
