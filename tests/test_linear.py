import pytest
import torch
import torch.nn.functional as F

import exaone_ext
from exaone_ext import _C, ops
from exaone_ext.ops import reference
from conftest import DEVICES, DTYPES, assert_error_within

# the AVX512-BF16 kernel for bfloat16 runs on top of the avx512 variant when the CPU has it; the
# tests run bfloat16 with it on and off so that both paths are checked
HAS_BF16_DOT = ("avx512bf16" in exaone_ext.build_info()["cpu_extra_kernels"]
                and "avx512bf16" in exaone_ext.build_info()["cpu_features"])
BF16_DOT = [True, False] if HAS_BF16_DOT else [False]

ROWS = [1, 2, 3, 7, 16, 17, 64, 300]
SIZES = [(80, 80), (257, 131), (2560, 1000), (33, 257), (255, 9)]  # (in, out)


@pytest.fixture(params=BF16_DOT, ids=lambda d: "bf16dot" if d else "fma")
def bf16_dot(request):
    before = _C._set_linear_bf16_dot(request.param)
    yield request.param
    _C._set_linear_bf16_dot(before)


def _check(x, w, dy=None):
    """Forward (and backward with dy) against float64 and against F.linear in the same dtype."""
    xg, wg = x.clone().requires_grad_(dy is not None), w.clone().requires_grad_(dy is not None)
    out = ops.linear(xg, wg)
    x64, w64 = x.double().requires_grad_(dy is not None), w.double().requires_grad_(dy is not None)
    ref64 = F.linear(x64, w64)
    xl, wl = x.clone().requires_grad_(dy is not None), w.clone().requires_grad_(dy is not None)
    ref_lp = reference.linear(xl, wl)
    assert out.is_contiguous()
    assert_error_within(out, ref64, ref_lp, "out")
    if dy is not None:
        out.backward(dy)
        ref64.backward(dy.double())
        ref_lp.backward(dy)
        assert_error_within(xg.grad, x64.grad, xl.grad, "dx")
        assert_error_within(wg.grad, w64.grad, wl.grad, "dweight")


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("k,n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_matches_reference(m, k, n, dtype, device, cpu_isa, bf16_dot):
    if bf16_dot and (dtype != torch.bfloat16 or cpu_isa != "avx512"):
        pytest.skip("the bf16 dot kernel is for bfloat16 on the avx512 variant")
    x = torch.randn(m, k, device=device).to(dtype)
    w = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
    _check(x, w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 257), (1, 1, 257), (4, 257), (257,)])
def test_inputs_of_any_rank_and_gradients(shape, dtype, device, cpu_isa):
    x = torch.randn(shape, device=device).to(dtype)
    w = (torch.randn(96, 257, device=device) / 16).to(dtype)
    dy = torch.randn(*shape[:-1], 96, device=device).to(dtype)
    _check(x, w, dy)


def test_large_rows_gradients(device):
    x = torch.randn(5, 40, 130, device=device)
    w = torch.randn(70, 130, device=device) / 12
    _check(x, w, torch.randn(5, 40, 70, device=device))


def test_non_contiguous_inputs(device, cpu_isa):
    base = torch.randn(6, 2, 300, device=device)
    x = base[:, 1, 7:264]                       # strided rows with an offset
    wt = torch.randn(257, 50, device=device)
    w = wt.t()                                  # transposed weight: made contiguous by the op
    torch.testing.assert_close(ops.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-4)
    xt = torch.randn(257, 3, device=device).t()  # last dim not contiguous
    torch.testing.assert_close(ops.linear(xt, w), F.linear(xt, w), rtol=1e-5, atol=1e-4)
    wpad = torch.randn(50, 300, device=device)[:, :257]  # weight rows with padding
    torch.testing.assert_close(ops.linear(x, wpad), F.linear(x, wpad), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("m", [1, 2, 5])
def test_padded_weight_rows_bf16(m, device, cpu_isa, bf16_dot):
    """Weight rows further apart than in_features (a slice of a wider matrix): the kernels walk them
    by stride, and the sequential one-row kernel must not read the padding into its sums."""
    wide = (torch.randn(70, 300, device=device) / 16).to(torch.bfloat16)
    wide[:, 255:] = float("nan")  # any use of the padding shows
    w = wide[:, :255]
    x = torch.randn(m, 255, device=device).to(torch.bfloat16)
    out = ops.linear(x, w)
    assert torch.isfinite(out).all()
    assert_error_within(out, F.linear(x.double(), w.double()), F.linear(x, w), "out")


def test_special_values(cpu_isa):
    x = torch.zeros(2, 40)
    w = torch.randn(5, 40)
    x[0, 3] = float("inf")
    x[1, 5] = float("nan")
    out = ops.linear(x, w)
    assert not torch.isfinite(out[0]).any()
    assert torch.isnan(out[1]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty(dtype, device):
    w = torch.randn(8, 16, dtype=dtype, device=device)
    assert ops.linear(torch.empty(0, 16, dtype=dtype, device=device), w).shape == (0, 8)
    assert ops.linear(torch.empty(3, 0, 16, dtype=dtype, device=device), w).shape == (3, 0, 8)
    assert ops.linear(torch.empty(3, 16, dtype=dtype, device=device), w[:0]).shape == (3, 0)
    out = ops.linear(torch.empty(3, 0, dtype=dtype, device=device), torch.empty(8, 0, dtype=dtype, device=device))
    assert out.shape == (3, 8) and (out == 0).all()


@pytest.mark.parametrize("m", [1, 5, 40])
def test_gradcheck_float64(m, cpu_isa):
    x = torch.randn(m, 13, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 13, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.linear, (x, w))
    x3 = torch.randn(2, 3, 9, dtype=torch.float64, requires_grad=True)
    w3 = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.linear, (x3, w3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 40), (2, 20, 40)])
def test_opcheck(dtype, shape, device):
    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(24, 40, dtype=dtype, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.exaone_ext.linear.default, (x, w))


def test_bad_inputs():
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    with pytest.raises(ValueError, match="last dimension of 'x'.*in_features of 'weight'"):
        ops.linear(x, torch.randn(6, 9))
    with pytest.raises(TypeError, match="'weight' must have the same dtype as 'x'"):
        ops.linear(x, w.half())
    with pytest.raises(ValueError, match="'weight' must be 2-dimensional"):
        ops.linear(x, torch.randn(8))
    with pytest.raises(ValueError, match="'weight' must be 2-dimensional"):
        ops.linear(x, torch.randn(1, 6, 8))
    with pytest.raises(ValueError, match="'x' must have at least 1 dimension"):
        ops.linear(torch.tensor(1.0), w)
    with pytest.raises(TypeError, match="'x' must be float32, bfloat16 or float16"):
        ops.linear(x.int(), w.int())
    with pytest.raises(TypeError, match="'weight' must be a torch.Tensor"):
        ops.linear(x, [1.0])
    with pytest.raises(TypeError, match="'x' must be a torch.Tensor"):
        ops.linear(None, w)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="'weight' must be on the same device as 'x'"):
            ops.linear(x, w.cuda())


def test_reference_used_without_kernel():
    x, w = torch.empty(3, 5, 8, device="meta"), torch.empty(6, 8, device="meta")
    assert ops.linear(x, w).shape == (3, 5, 6)


# ---- linear_cat: x @ cat(weights).T without concatenating the weights ----------------------------------
@pytest.mark.parametrize("m", [1, 3, 16, 17, 300])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_cat_equals_separate_linears(m, dtype, device, cpu_isa, bf16_dot):
    # output sizes that are not multiples of the kernel's block of 4, and one weight of a single row
    k = 257
    ws = [torch.randn(n, k, device=device).to(dtype) for n in (130, 1, 64, 33)]
    x = torch.randn(m, k, device=device).to(dtype)
    out = ops.linear_cat(x, ws)
    assert out.shape == (m, 228) and out.is_contiguous()
    # each weight's columns are exactly what linear gives for it alone
    assert torch.equal(out, torch.cat([ops.linear(x, w) for w in ws], -1))
    ref64 = reference.linear_cat(x.double(), [w.double() for w in ws])
    assert_error_within(out, ref64, reference.linear_cat(x, ws), "out")


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_cat_gradients(dtype, device):
    x = torch.randn(2, 5, 96, device=device).to(dtype)
    ws = [torch.randn(n, 96, device=device).to(dtype) for n in (40, 24)]
    dy = torch.randn(2, 5, 64, device=device).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (x, *ws)]
    ops.linear_cat(leaves[0], leaves[1:]).backward(dy)
    leaves64 = [t.double().requires_grad_() for t in (x, *ws)]
    reference.linear_cat(leaves64[0], leaves64[1:]).backward(dy.double())
    leaves_lp = [t.clone().requires_grad_() for t in (x, *ws)]
    reference.linear_cat(leaves_lp[0], leaves_lp[1:]).backward(dy)
    for name, a, b, c in zip(["dx", "dw0", "dw1"], leaves, leaves64, leaves_lp):
        assert_error_within(a.grad, b.grad, c.grad, name)


def test_linear_cat_gradcheck_and_opcheck(device):
    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    a = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, b: ops.linear_cat(x, [a, b]), (x, a, b))
    for dtype in (torch.float32, torch.bfloat16):
        xs = torch.randn(2, 4, 40, dtype=dtype, device=device, requires_grad=True)
        ws = [torch.randn(n, 40, dtype=dtype, device=device, requires_grad=True) for n in (24, 8)]
        torch.library.opcheck(torch.ops.exaone_ext.linear_cat.default, (xs, ws))


def test_linear_cat_bad_inputs():
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    with pytest.raises(ValueError, match="at least one weight"):
        ops.linear_cat(x, [])
    with pytest.raises(ValueError, match=r"weights\[1\]: the last dimension of 'x'.*in_features"):
        ops.linear_cat(x, [w, torch.randn(6, 9)])
    with pytest.raises(TypeError, match=r"weights\[1\]: 'weight' must have the same dtype as 'x'"):
        ops.linear_cat(x, [w, w.half()])
    with pytest.raises(TypeError, match=r"'weights\[0\]' must be a torch.Tensor"):
        ops.linear_cat(x, [1.0])
    with pytest.raises(TypeError, match="'weights' must be a list or tuple"):
        ops.linear_cat(x, w)
    assert ops.linear_cat(torch.empty(0, 8), [w]).shape == (0, 6)
    meta = ops.linear_cat(torch.empty(3, 8, device="meta"), [torch.empty(6, 8, device="meta")] * 2)
    assert meta.shape == (3, 12)
