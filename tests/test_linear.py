import contextlib

import pytest
import torch
import torch.nn.functional as F

import exaone_ext
from exaone_ext import _C, ops
from exaone_ext.ops import reference
from conftest import CPU_ISAS, CUDA, DEVICES, DTYPES, LINEAR_BRGEMM, assert_error_within

# The weight-streaming kernels (one per CPU variant) take up to 16 rows of x (8 for bfloat16 through
# convert + FMA where the CPU's matmul has bf16 instructions, 64 for a 16-bit type where it has none);
# more rows go to at::matmul (float32 tiles of a 16-bit weight where the CPU has no instructions for
# it), where the CPU variant plays no part. The AVX512-BF16 dot
# kernel is a variant of its own for bfloat16 ("avx512bf16": avx512 with the dot kernel on; "avx512"
# then runs bfloat16 through convert + FMA). On AVX2, several rows against bfloat16 weights take tiles
# that split the weights into even / odd elements against x in pair order; "avx2-widen" is avx2 with
# those off (every weight widened one by one, as for one row). "brgemm": bfloat16 with 16-64 rows
# through oneDNN's brgemm (the weight rows read in place as its A; AMX tiles where the CPU has them),
# the default wherever brgemm works; the other variants run with it off, so that their own kernels
# (and at::matmul) are what they test.
HAS_BF16_DOT = ("avx512bf16" in exaone_ext.build_info()["cpu_extra_kernels"]
                and "avx512bf16" in exaone_ext.build_info()["cpu_features"])

HAS_BRGEMM = LINEAR_BRGEMM
LINEAR_VARIANTS = ((["avx512bf16"] if HAS_BF16_DOT else []) + (["brgemm"] if HAS_BRGEMM else []) + CPU_ISAS
                   + (["avx2-widen"] if "avx2" in CPU_ISAS else []))
BF16_ONLY_VARIANTS = ("avx512bf16", "avx2-widen", "brgemm")
# the rows that take brgemm where it is on: 16-64, from 6 where the CPU has AMX-BF16
BRGEMM_ROWS = tuple(exaone_ext.build_info()["cpu_linear_brgemm_rows"])
# (variant, dtype): the dot and widen variants only for bfloat16, where they differ from their ISA's
VARIANT_DTYPES = [(v, d) for v in LINEAR_VARIANTS for d in DTYPES if v not in BF16_ONLY_VARIANTS or d == torch.bfloat16]
_FEATURES = set(exaone_ext.build_info()["cpu_features"])
NATIVE_BF16_MATMUL, NATIVE_F16_MATMUL = bool({"avx512bf16", "amx_bf16"} & _FEATURES), "avx512fp16" in _FEATURES
STREAM_MAX_ROWS = {torch.float32: 16, torch.float16: 16 if NATIVE_F16_MATMUL else 64,
                   torch.bfloat16: 8 if NATIVE_BF16_MATMUL else 64}
MATMUL_ROWS = [17, 300]
SIZES = [(80, 80), (257, 131), (2560, 1000), (33, 257), (255, 9)]  # (in, out)


def stream_max_rows(variant: str, dtype: torch.dtype) -> int:
    return 16 if variant == "avx512bf16" else STREAM_MAX_ROWS[dtype]


def variant_rows(variant: str, dtype: torch.dtype) -> tuple[int, ...]:
    """Rows 1-4, 7 and the kernel's limit; brgemm: its first rows, ragged ones (x padded to a
    multiple of 16 rows), and its limit."""
    first, last = BRGEMM_ROWS
    return tuple(sorted({first, first + 1, 17, 31, last})) if variant == "brgemm" else (
        1, 2, 3, 4, 7, stream_max_rows(variant, dtype))


VARIANT_DTYPE_ROWS = [pytest.param(v, d, m, id=f"{v}-{str(d)[6:]}-{m}") for v, d in VARIANT_DTYPES
                      for m in variant_rows(v, d)]


@contextlib.contextmanager
def linear_variant(variant: str):
    """Runs the block on one CPU linear variant (the ISA, and the bf16 dot kernel on or off)."""
    before_isa = exaone_ext.get_cpu_isa()
    before_dot = _C._set_linear_bf16_dot(variant in ("avx512bf16", "brgemm"))
    before_pairs = _C._set_linear_bf16_pairs(variant != "avx2-widen")
    before_brgemm = _C._set_linear_brgemm(1 if variant == "brgemm" else 0)
    exaone_ext.set_cpu_isa({"avx512bf16": "avx512", "avx2-widen": "avx2", "brgemm": "avx512"}.get(variant, variant))
    try:
        yield
    finally:
        exaone_ext.set_cpu_isa(before_isa)
        _C._set_linear_bf16_dot(before_dot)
        _C._set_linear_bf16_pairs(before_pairs)
        _C._set_linear_brgemm(before_brgemm)


@pytest.fixture(params=LINEAR_VARIANTS)
def variant(request):
    with linear_variant(request.param):
        yield request.param


def _check(x, w, dy=None):
    """Forward (and backward with dy) against float64 (the error rule, reduction over in_features for
    the output and dx's over out_features, dweight's over the rows)."""
    xg, wg = x.clone().requires_grad_(dy is not None), w.clone().requires_grad_(dy is not None)
    out = ops.linear(xg, wg)
    x64, w64 = x.double().requires_grad_(dy is not None), w.double().requires_grad_(dy is not None)
    ref64 = F.linear(x64, w64)
    assert out.is_contiguous()
    assert_error_within(out, ref64, name="out", k=w.shape[1])
    if dy is not None:
        out.backward(dy)
        ref64.backward(dy.double())
        assert_error_within(xg.grad, x64.grad, name="dx", k=w.shape[0])
        assert_error_within(wg.grad, w64.grad, name="dweight", k=max(1, x.numel() // max(1, x.shape[-1])))


@pytest.mark.parametrize("k,n", SIZES)
@pytest.mark.parametrize("variant_name,dtype,m", VARIANT_DTYPE_ROWS)
def test_forward_kernel_matches_reference(m, k, n, variant_name, dtype):
    """Every streaming kernel (rows up to its limit) on every CPU variant."""
    x = torch.randn(m, k).to(dtype)
    w = (torch.randn(n, k) / k**0.5).to(dtype)
    with linear_variant(variant_name):
        _check(x, w)


def test_brgemm_is_the_default_for_bf16_rows_where_it_works():
    """16-64 bfloat16 rows take oneDNN's brgemm by default wherever it works (build_info names the
    engine); switched off, the report falls back to the streaming kernels' variant."""
    engine = exaone_ext.build_info()["cpu_linear_bf16_rows"]
    assert engine.startswith("oneDNN brgemm") == HAS_BRGEMM, engine
    before = _C._set_linear_brgemm(0)
    try:
        assert not exaone_ext.build_info()["cpu_linear_bf16_rows"].startswith("oneDNN")
    finally:
        _C._set_linear_brgemm(before)
    assert before == 1


@pytest.mark.skipif(not HAS_BRGEMM, reason="oneDNN's brgemm does not run bfloat16 on this CPU")
@pytest.mark.parametrize("m", sorted({BRGEMM_ROWS[0] - 1, BRGEMM_ROWS[0], 15, 16, 40, 64, 65}))
def test_brgemm_rows_match_the_other_engines(m):
    """At the edges of brgemm's rows, the default (brgemm where in range) and brgemm off (streaming
    kernel or at::matmul) both meet the error rule, on the 2.4B model's widest input (k = 7168)."""
    x = torch.randn(m, 2, 7168 + 5).bfloat16()[:, 1, 5:]   # a strided view at an offset
    w = (torch.randn(96, 7168) / 7168**0.5).bfloat16()
    ref = F.linear(x.double(), w.double())
    on = ops.linear(x, w)
    before = _C._set_linear_brgemm(0)
    try:
        off = ops.linear(x, w)
    finally:
        _C._set_linear_brgemm(before)
    assert_error_within(on, ref, name="out (default)", k=7168)
    assert_error_within(off, ref, name="out (brgemm off)", k=7168)


@pytest.mark.skipif(not HAS_BRGEMM, reason="oneDNN's brgemm does not run bfloat16 on this CPU")
def test_brgemm_rows_special_values_and_empty():
    """brgemm's rows: inf / NaN in x give what float64 gives (the zero rows x is padded with must not
    leak into real rows), and a weight without rows gives an empty result."""
    x = torch.randn(20, 96).bfloat16()
    w = torch.randn(40, 96).bfloat16()
    x[3, 7], x[19, 0] = float("nan"), float("inf")
    out, ref = ops.linear(x, w), F.linear(x.double(), w.double())
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    assert torch.isfinite(out[:3]).all() and torch.isfinite(out[4:19]).all()
    assert ops.linear(x, w[:0]).shape == (20, 0)


@pytest.mark.parametrize("m", [1, 3])
def test_no_variant_sums_in_one_running_sum(m, cpu_isa):
    """A large product first, then 2559 products too small to move a float32 sum that holds it (2^-25
    each, half an ulp of 1): one running sum loses all of them; the kernels keep several partial sums
    (the vector lanes, or eight of the scalar variant's own) and lose at most a quarter."""
    k, tiny = 2560, 2.0**-25
    w = torch.full((8, k), tiny)
    w[:, 0] = 1.0
    x = torch.ones(m, k)
    out = ops.linear(x, w)
    lost = (1 + (k - 1) * tiny) - out.double()
    assert (lost.abs() <= k / 4 * tiny).all(), f"lost {lost.abs().max().item():.3g} of {(k - 1) * tiny:.3g}"


@pytest.mark.parametrize("m", MATMUL_ROWS)
@pytest.mark.parametrize("k,n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_many_rows_matches_reference(m, k, n, dtype, device):
    """Above the streaming limit (at::matmul on the CPU): one run, the CPU variant plays no part."""
    x = torch.randn(m, k, device=device).to(dtype)
    w = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
    _check(x, w)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="CUDA: no device")
@pytest.mark.parametrize("m", [1, 7, 16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_few_rows_cuda(m, dtype):
    x = torch.randn(m, 257, device="cuda").to(dtype)
    w = (torch.randn(131, 257, device="cuda") / 16).to(dtype)
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


@pytest.mark.parametrize("m", [1, 2, 5, 20])
def test_padded_weight_rows_bf16(m, device, variant):
    """Weight rows further apart than in_features (a slice of a wider matrix): the kernels walk them
    by stride, and the sequential one-row kernel must not read the padding into its sums."""
    wide = (torch.randn(70, 300, device=device) / 16).to(torch.bfloat16)
    wide[:, 255:] = float("nan")  # any use of the padding shows
    w = wide[:, :255]
    x = torch.randn(m, 255, device=device).to(torch.bfloat16)
    out = ops.linear(x, w)
    assert torch.isfinite(out).all()
    assert_error_within(out, F.linear(x.double(), w.double()), name="out", k=255)


def test_special_values(cpu_isa):
    x = torch.zeros(2, 40)
    w = torch.randn(5, 40)
    x[0, 3] = float("inf")
    x[1, 5] = float("nan")
    out = ops.linear(x, w)
    assert not torch.isfinite(out[0]).any()
    assert torch.isnan(out[1]).all()


@pytest.mark.parametrize("m", [2, 3, 7, 20])
def test_special_values_bf16_rows(m, variant):
    """inf / NaN in x and in the weight, at even and odd positions and in the tail past the last
    pair group (k = 40: two groups of 16, then 8), through every several-row bf16 path: the same
    non-finite outputs as float64."""
    torch.manual_seed(0)
    x = torch.randn(m, 40).bfloat16()
    w = torch.randn(6, 40).bfloat16()
    x[0, 4], x[1, 7], x[m - 1, 37] = float("inf"), float("nan"), float("-inf")
    w[2, 10], w[3, 11], w[4, 38] = float("nan"), float("inf"), float("-inf")
    out = ops.linear(x, w)
    ref = F.linear(x.double(), w.double())
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.equal(torch.isinf(out), torch.isinf(ref))
    assert torch.equal(out.isposinf(), ref.isposinf())
    finite = torch.isfinite(ref)
    assert_error_within(out[finite], ref[finite], name="out", k=40)


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty(dtype, device):
    w = torch.randn(8, 16, dtype=dtype, device=device)
    assert ops.linear(torch.empty(0, 16, dtype=dtype, device=device), w).shape == (0, 8)
    assert ops.linear(torch.empty(3, 0, 16, dtype=dtype, device=device), w).shape == (3, 0, 8)
    assert ops.linear(torch.empty(3, 16, dtype=dtype, device=device), w[:0]).shape == (3, 0)
    out = ops.linear(torch.empty(3, 0, dtype=dtype, device=device), torch.empty(8, 0, dtype=dtype, device=device))
    assert out.shape == (3, 8) and (out == 0).all()


@pytest.mark.parametrize("m", [1, 5, 40])
def test_gradcheck_float64(m):
    # float64 has one kernel (a plain loop, every CPU variant) up to 16 rows, at::matmul above
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
    if CUDA:
        with pytest.raises(ValueError, match="'weight' must be on the same device as 'x'"):
            ops.linear(x, w.cuda())


def test_reference_used_without_kernel(no_kernel):
    """A device without kernels (here the CPU, with has_kernel made to say so) runs the plain-PyTorch
    reference: no exaone_ext op is dispatched, and the results are the reference's."""
    x, w = torch.randn(3, 5, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True)
    ws = [torch.randn(4, 8), torch.randn(2, 8)]
    with no_kernel() as seen:
        out = ops.linear(x, w)
        out.sum().backward()
        cat = ops.linear_cat(x, ws)
    assert seen == set()
    assert torch.equal(out, reference.linear(x, w)) and torch.equal(cat, reference.linear_cat(x, ws))
    assert torch.equal(x.grad, torch.ones(3, 5, 6) @ w)


# ---- linear_cat: x @ cat(weights).T without concatenating the weights ----------------------------------
# every variant through the streaming kernels; at::matmul's rows once
LINEAR_CAT_CASES = ([pytest.param(v, d, m, id=f"{v}-{str(d)[6:]}-{m}") for v, d in VARIANT_DTYPES
                     for m in ((16, 40) if v == "brgemm" else (1, 3, 16))]
                    + [pytest.param(CPU_ISAS[0], d, m, id=f"matmul-{str(d)[6:]}-{m}") for d in DTYPES for m in (17, 300)])


@pytest.mark.parametrize("variant_name,dtype,m", LINEAR_CAT_CASES)
def test_linear_cat_equals_separate_linears(m, variant_name, dtype, device):
    with linear_variant(variant_name):
        _linear_cat_equals_separate_linears(m, dtype, device)


def _linear_cat_equals_separate_linears(m, dtype, device):
    # output sizes that are not multiples of the kernel's block of 4, and one weight of a single row
    k = 257
    ws = [torch.randn(n, k, device=device).to(dtype) for n in (130, 1, 64, 33)]
    x = torch.randn(m, k, device=device).to(dtype)
    out = ops.linear_cat(x, ws)
    assert out.shape == (m, 228) and out.is_contiguous()
    # each weight's columns are exactly what linear gives for it alone
    assert torch.equal(out, torch.cat([ops.linear(x, w) for w in ws], -1))
    ref64 = reference.linear_cat(x.double(), [w.double() for w in ws])
    assert_error_within(out, ref64, name="out", k=k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_cat_gradients(dtype, device):
    x = torch.randn(2, 5, 96, device=device).to(dtype)
    ws = [torch.randn(n, 96, device=device).to(dtype) for n in (40, 24)]
    dy = torch.randn(2, 5, 64, device=device).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (x, *ws)]
    ops.linear_cat(leaves[0], leaves[1:]).backward(dy)
    leaves64 = [t.double().requires_grad_() for t in (x, *ws)]
    reference.linear_cat(leaves64[0], leaves64[1:]).backward(dy.double())
    for name, a, b, k in zip(["dx", "dw0", "dw1"], leaves, leaves64, [64, 10, 10]):
        assert_error_within(a.grad, b.grad, name=name, k=k)


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cat_many_rows_16bit(dtype):
    """linear_cat above the streaming limit in 16-bit types (float32 tiles of each weight where the
    CPU's matmul has no instructions for the type): the columns of each weight in order."""
    x = torch.randn(100, 257).to(dtype)
    ws = [(torch.randn(n, 257) / 16).to(dtype) for n in (33, 70, 5)]
    out = ops.linear_cat(x, ws)
    assert out.shape == (100, 108) and out.dtype == dtype
    assert_error_within(out, F.linear(x.double(), torch.cat(ws).double()), name="out", k=257)
