"""linear_int8 / linear_int4 against dequantise-then-matmul, on every CPU kernel variant; the
quantisers; the AWQ conversion against an unpacking written here from the format's description."""
import pytest
import torch
import torch.nn.functional as F

import exaone_ext
from exaone_ext import _C, ops
from exaone_ext.model.awq import awq_to_int4
from exaone_ext.ops import reference
from conftest import CPU_ISAS, DEVICES, DTYPES, assert_error_within

ROWS = [1, 2, 7, 16, 17, 65]              # 17 or 65: the tiled prefill path (65 for 16-bit x on a CPU
                                          # without instructions for it, which streams through 64)


def _int8(n_out, n_in, device, scale_dtype=torch.float32):
    w = torch.randn(n_out, n_in, device=device) / n_in**0.5
    q, s = reference.quantize_int8(w)
    return q, s.to(scale_dtype)


def _int4(n_out, n_in, device, group=128, scale_dtype=torch.float32):
    w = torch.randn(n_out, n_in, device=device) / n_in**0.5
    q, s, z = reference.quantize_int4(w, group)
    return q, s.to(scale_dtype), z


def _check(out, x, w64, ref_lp):
    """Kernel vs float64 (x and the dequantised weight exactly), within 2x of the reference's error."""
    ref64 = F.linear(x.double(), w64)
    assert out.dtype == x.dtype and out.is_contiguous()
    assert_error_within(out, ref64, ref_lp, "out")


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("k,n", [(80, 7), (257, 33), (2560, 67)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_matches_reference(m, k, n, dtype, device, cpu_isa):
    q, s = _int8(n, k, device, dtype if k == 257 else torch.float32)  # scales in x's dtype too
    x = torch.randn(m, k, device=device).to(dtype)
    out = ops.linear_int8(x, q, s)
    _check(out, x, q.double() * s.double()[:, None], reference.linear_int8(x, q, s))


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("k,n,group", [(128, 7, 128), (384, 33, 128), (2560, 65, 128), (96, 9, 32)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_int4_matches_reference(m, k, n, group, dtype, device, cpu_isa):
    q, s, z = _int4(n, k, device, group, dtype if k == 384 else torch.float32)
    x = torch.randn(m, k, device=device).to(dtype)
    out = ops.linear_int4(x, q, s, z, group)
    w64 = reference.dequantize_int4(q, s.double(), z, group, torch.float64)
    _check(out, x, w64, reference.linear_int4(x, q, s, z, group))


INT_DOT_ISAS = [i for i in ("avx512", "avx2") if i in exaone_ext.build_info()["cpu_isa_compiled"]
                and i in CPU_ISAS]
# the integer paths' AVX512-VNNI variant (vpdpbusd / vpdpwssd), where the build and the CPU have it;
# "avx512" then runs without it
if "avx512" in INT_DOT_ISAS and "avx512vnni" in exaone_ext.build_info()["cpu_extra_kernels"] \
        and "avx512vnni" in exaone_ext.build_info()["cpu_features"]:
    INT_DOT_ISAS = ["avx512vnni"] + INT_DOT_ISAS


def _use_isa(isa):
    """Select a variant of INT_DOT_ISAS (or "auto"); returns the VNNI switch's previous setting."""
    exaone_ext.set_cpu_isa("avx512" if isa == "avx512vnni" else isa)
    return _C._set_cpu_avx512vnni(isa in ("avx512vnni", "auto"))


@pytest.fixture(params=[True, False], ids=["int-dot", "widened"])
def int_dot(request):
    """linear_int4 with 16-bit x on both CPU paths: x as 15-bit integers against the nibbles, and
    the weights widened to float32."""
    before = _C._set_quant_int_dot(request.param)
    yield request.param
    _C._set_quant_int_dot(before)


@pytest.mark.parametrize("isa", INT_DOT_ISAS)
@pytest.mark.parametrize("group,groups", [(32, 3), (32, 8), (64, 2), (64, 6), (96, 2), (128, 3), (256, 1)])
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int4_both_cpu_paths(isa, group, groups, m, dtype, int_dot):
    """Every unpacking order of the integer path (steps of 128, a 64, a trailing 32), blocks of 8, 4
    and 1 features (n = 13), 1 to 16 rows, scales in x's dtype and in float32."""
    _use_isa(isa)
    try:
        k, n = group * groups, 13
        q, s, z = _int4(n, k, "cpu", group, dtype if groups == 2 else torch.float32)
        x = torch.randn(m, k).to(dtype)
        out = ops.linear_int4(x, q, s, z, group)
        _check(out, x, reference.dequantize_int4(q, s.double(), z, group, torch.float64),
               reference.linear_int4(x, q, s, z, group))
    finally:
        _use_isa("auto")


@pytest.mark.parametrize("outlier", [100.0, 1000.0])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int4_outlier_activations(outlier, dtype, int_dot):
    """A few input channels hundreds of times larger than the rest (as in real models' activations):
    the integer path's x, 15 bits per group of 128 scaled to the group's largest value, still meets
    the error rule."""
    k, n = 2048, 96
    q, s, z = _int4(n, k, "cpu")
    x = torch.randn(4, k)
    x[:, [5, 700, 1500]] *= outlier
    x = x.to(dtype)
    out = ops.linear_int4(x, q, s, z)
    _check(out, x, reference.dequantize_int4(q, s.double(), z, 128, torch.float64), reference.linear_int4(x, q, s, z))
    q8, s8 = _int8(n, k, "cpu")                           # int8: x as 15 bits per block of 128 too
    _check(ops.linear_int8(x, q8, s8), x, q8.double() * s8.double()[:, None], reference.linear_int8(x, q8, s8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int4_offset_activations(dtype, int_dot):
    """x far from zero mean (every value near 3): the zero points' part of each group's sum, z times
    the sum of x, is then most of it and cancels against the rest; the result still meets the error
    rule."""
    k, n = 2560, 72
    q, s, z = _int4(n, k, "cpu")
    for m in (1, 3, 8):
        x = (3 + 0.05 * torch.randn(m, k)).to(dtype)
        out = ops.linear_int4(x, q, s, z)
        _check(out, x, reference.dequantize_int4(q, s.double(), z, 128, torch.float64),
               reference.linear_int4(x, q, s, z))
        q8, s8 = _int8(n, k, "cpu")
        _check(ops.linear_int8(x, q8, s8), x, q8.double() * s8.double()[:, None], reference.linear_int8(x, q8, s8))


@pytest.mark.parametrize("isa", INT_DOT_ISAS)
@pytest.mark.parametrize("k", [16, 128, 304, 2560, 264])
@pytest.mark.parametrize("m", [1, 3, 4, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int8_both_cpu_paths(isa, k, m, dtype, int_dot):
    """int8 with 16-bit x on both CPU paths: whole blocks of 128, a shorter last block (304 = 2 x 128
    + 48, 16 alone), k not a multiple of 16 (264 = 16 x 16 + 8: the float path), blocks of 8, 4 and 1
    features (n = 13), tiles of 1, 2 and 4 rows (16 rows: the float path on both), contiguous and
    padded weight rows."""
    _use_isa(isa)
    try:
        q, s = _int8(13, k, "cpu", dtype if m == 3 else torch.float32)
        x = torch.randn(m, k).to(dtype)
        w64 = q.double() * s.double()[:, None]
        _check(ops.linear_int8(x, q, s), x, w64, reference.linear_int8(x, q, s))
        qpad = torch.zeros(13, k + 40, dtype=torch.int8)
        qpad[:, :k] = q
        _check(ops.linear_int8(x, qpad[:, :k], s), x, w64, reference.linear_int8(x, q, s))
    finally:
        _use_isa("auto")


@pytest.mark.skipif(not INT_DOT_ISAS, reason="no CPU variant with integer multiply-adds on this machine")
@pytest.mark.parametrize("isa", INT_DOT_ISAS)
@pytest.mark.parametrize("row_stream", [True, False], ids=["stream", "blocks"])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_one_row_stream_and_blocks(isa, row_stream, scale_dtype):
    """One row of 16-bit x on the integer paths: features one after the other (the weight as one
    stream, the default) and blocks of features side by side. int4: every group the kernels
    special-case and one they do not (96), 1 to 80 groups (a tail past the eight-group steps of
    the scale tables), 1 to 37 features, contiguous and padded rows; int8: whole blocks of 128, a
    shorter last block, k of one block of 16. Both routes meet the error rule and agree with each
    other to float32 rounding."""
    _use_isa(isa)
    before = _C._set_quant_row_stream(row_stream)
    try:
        # groups of 32 / 64 with k a multiple of 128: 64-byte steps with a scale per 16-byte lane
        for group, groups, n in [(128, 20, 37), (128, 9, 5), (32, 3, 13), (64, 2, 8), (96, 1, 1), (256, 2, 9),
                                 (32, 80, 11), (32, 4, 3), (64, 40, 7), (64, 6, 2)]:
            k = group * groups
            q, s, z = _int4(n, k, "cpu", group, scale_dtype)
            for dtype in (torch.bfloat16, torch.float16) if scale_dtype == torch.float32 else (scale_dtype,):
                x = torch.randn(1, k).to(dtype)
                w64 = reference.dequantize_int4(q, s.double(), z, group, torch.float64)
                out = ops.linear_int4(x, q, s, z, group)
                _check(out, x, w64, reference.linear_int4(x, q, s, z, group))
                qpad = torch.zeros(n, k // 2 + 24, dtype=torch.uint8)
                qpad[:, :k // 2] = q
                _check(ops.linear_int4(x, qpad[:, :k // 2], s, z, group), x, w64, reference.linear_int4(x, q, s, z, group))
                _C._set_quant_row_stream(not row_stream)
                other = ops.linear_int4(x, q, s, z, group)
                _C._set_quant_row_stream(row_stream)
                torch.testing.assert_close(out.float(), other.float(), rtol=2e-2 if dtype == torch.bfloat16 else 2e-3,
                                           atol=1e-3)
        for k, n in [(2560, 37), (304, 13), (16, 3), (7168, 9)]:
            q, s = _int8(n, k, "cpu", scale_dtype)
            x = torch.randn(1, k).to(torch.bfloat16 if scale_dtype == torch.float32 else scale_dtype)
            w64 = q.double() * s.double()[:, None]
            _check(ops.linear_int8(x, q, s), x, w64, reference.linear_int8(x, q, s))
            qpad = torch.zeros(n, k + 40, dtype=torch.int8)
            qpad[:, :k] = q
            _check(ops.linear_int8(x, qpad[:, :k], s), x, w64, reference.linear_int8(x, q, s))
    finally:
        _C._set_quant_row_stream(before)
        _use_isa("auto")


@pytest.mark.skipif(not INT_DOT_ISAS, reason="no CPU variant with integer multiply-adds on this machine")
def test_one_row_prefetch_distance_changes_nothing_but_speed():
    # the one-row streams' prefetch distance (per CPU by default; benchmarks sweep it) never changes a
    # result: none, a line, the defaults and 1 MiB (far past every weight here) give the same bits
    info = exaone_ext.build_info()["cpu_quant_prefetch_ahead"]
    assert set(info) == {"int8", "int4"} and all(v in (1024, 4096) for v in info.values())
    x = torch.randn(1, 2560).to(torch.bfloat16)
    q8, s8 = _int8(300, 2560, "cpu")
    q4, s4, z4 = _int4(300, 2560, "cpu", 128, torch.bfloat16)
    outs = {}
    try:
        for bytes_ahead in (-1, 0, 64, 4096, 1 << 20):
            before8 = _C._set_quant_prefetch_ahead(8, bytes_ahead)
            before4 = _C._set_quant_prefetch_ahead(4, bytes_ahead)
            if bytes_ahead == -1:
                assert (before8, before4) == (info["int8"], info["int4"])
            outs[bytes_ahead] = (ops.linear_int8(x, q8, s8), ops.linear_int4(x, q4, s4, z4, 128))
    finally:
        _C._set_quant_prefetch_ahead(8, -1)
        _C._set_quant_prefetch_ahead(4, -1)
    for o8, o4 in outs.values():
        assert torch.equal(o8, outs[-1][0]) and torch.equal(o4, outs[-1][1])
    assert _C._set_quant_prefetch_ahead(8, -1) == info["int8"]
    with pytest.raises(ValueError, match="bits must be 8 .int8. or 4 .int4., got 16"):
        _C._set_quant_prefetch_ahead(16, 1024)
    with pytest.raises(ValueError, match=r"bytes must be in 0..1048576 .or -1 for this CPU's default., got -2"):
        _C._set_quant_prefetch_ahead(4, -2)
    with pytest.raises(ValueError, match="got 1048577"):
        _C._set_quant_prefetch_ahead(8, (1 << 20) + 1)


@pytest.mark.skipif(not INT_DOT_ISAS, reason="no CPU variant with integer multiply-adds on this machine")
def test_int8_integer_path_runs_and_falls_back():
    q, s = _int8(64, 2560, "cpu")
    x = torch.randn(4, 2560).to(torch.bfloat16)                # up to 4 rows take it
    before = _C._set_quant_int_dot(True)
    try:
        fast = ops.linear_int8(x, q, s)
        _C._set_quant_int_dot(False)
        assert not torch.equal(fast, ops.linear_int8(x, q, s)), "the integer path did not run"
        x5 = torch.randn(5, 2560).to(torch.bfloat16)               # 5 rows: the float path's tiles
        _C._set_quant_int_dot(True)
        a5 = ops.linear_int8(x5, q, s)
        _C._set_quant_int_dot(False)
        assert torch.equal(a5, ops.linear_int8(x5, q, s))
        x32 = x.float()                              # float32 x never takes it
        _C._set_quant_int_dot(True)
        a = ops.linear_int8(x32, q, s)
        _C._set_quant_int_dot(False)
        assert torch.equal(a, ops.linear_int8(x32, q, s))
        # x the integers cannot hold (inf / NaN, a block of values below 1e-30) goes the float way
        for bad in (float("inf"), float("nan"), 1e-35):
            xb = x.clone()
            xb[3, 128:256] = 0
            xb[3, 130] = bad
            _C._set_quant_int_dot(False)
            want = ops.linear_int8(xb, q, s)
            _C._set_quant_int_dot(True)
            torch.testing.assert_close(ops.linear_int8(xb, q, s), want, rtol=0, atol=0, equal_nan=True)
    finally:
        _C._set_quant_int_dot(before)


def test_int4_16bit_views_and_empty(int_dot):
    """bfloat16 x as a view (rows with an offset and a step, a transposed last dimension), of rank 3,
    and with zero rows, on both CPU paths (int8 too)."""
    q, s, z = _int4(40, 256, "cpu")
    q8, s8 = _int8(40, 256, "cpu")
    base = torch.randn(5, 2, 300).to(torch.bfloat16)
    for x in (base[:, 1, 7:263], base[::2, 0, 3:259], torch.randn(256, 3).to(torch.bfloat16).t(),
              torch.randn(2, 3, 256).to(torch.bfloat16)):
        _check(ops.linear_int4(x, q, s, z), x, reference.dequantize_int4(q, s.double(), z, 128, torch.float64),
               reference.linear_int4(x, q, s, z))
        _check(ops.linear_int8(x, q8, s8), x, q8.double() * s8.double()[:, None], reference.linear_int8(x, q8, s8))
    assert ops.linear_int4(torch.randn(0, 256).to(torch.bfloat16), q, s, z).shape == (0, 40)
    assert ops.linear_int8(torch.randn(0, 256).to(torch.bfloat16), q8, s8).shape == (0, 40)


@pytest.mark.skipif(not INT_DOT_ISAS, reason="no CPU variant with integer multiply-adds on this machine")
def test_int4_integer_path_runs_and_falls_back():
    q, s, z = _int4(64, 2560, "cpu")
    x = torch.randn(16, 2560).to(torch.float16)
    before = _C._set_quant_int_dot(True)
    try:
        fast = ops.linear_int4(x, q, s, z)
        _C._set_quant_int_dot(False)
        widened = ops.linear_int4(x, q, s, z)
        assert not torch.equal(fast, widened), "the integer path did not run (identical to the widened path)"
        # float32 x never takes it
        x32 = x.float()
        _C._set_quant_int_dot(True)
        a = ops.linear_int4(x32, q, s, z)
        _C._set_quant_int_dot(False)
        assert torch.equal(a, ops.linear_int4(x32, q, s, z))
        # x the integers cannot hold (inf / NaN, a group of values below 1e-30) goes the widened way
        for bad in (float("inf"), float("nan"), 1e-35):
            xb = x.to(torch.bfloat16)                # bfloat16 holds 1e-35
            xb[3, 128:256] = 0                       # the second group of row 3: only the bad value
            xb[3, 130] = bad
            _C._set_quant_int_dot(False)
            want = ops.linear_int4(xb, q, s, z)
            _C._set_quant_int_dot(True)
            torch.testing.assert_close(ops.linear_int4(xb, q, s, z), want, rtol=0, atol=0, equal_nan=True)
    finally:
        _C._set_quant_int_dot(before)


def test_any_rank_strided_and_empty(device, cpu_isa):
    q8, s8 = _int8(40, 256, device)
    q4, s4, z4 = _int4(40, 256, device)
    base = torch.randn(3, 2, 300, device=device)
    x = base[:, 1, 7:263]                                  # strided rows with an offset
    torch.testing.assert_close(ops.linear_int8(x, q8, s8), reference.linear_int8(x, q8, s8), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ops.linear_int4(x, q4, s4, z4), reference.linear_int4(x, q4, s4, z4),
                               rtol=1e-5, atol=1e-5)
    x3 = torch.randn(2, 3, 256, device=device)
    assert ops.linear_int8(x3, q8, s8).shape == (2, 3, 40)
    assert ops.linear_int4(x3, q4, s4, z4).shape == (2, 3, 40)
    assert ops.linear_int8(torch.randn(0, 256, device=device), q8, s8).shape == (0, 40)
    qpad = torch.randint(-127, 128, (40, 300), dtype=torch.int8, device=device)[:, :256]  # padded weight rows
    torch.testing.assert_close(ops.linear_int8(x, qpad, s8), reference.linear_int8(x, qpad, s8),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_gradient_in_x(fmt, device):
    x = torch.randn(3, 256, device=device, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    if fmt == "int8":
        q, s = _int8(24, 256, device)
        y, yr = ops.linear_int8(x, q, s), reference.linear_int8(xr, q, s)
    else:
        q, s, z = _int4(24, 256, device)
        y, yr = ops.linear_int4(x, q, s, z), reference.linear_int4(xr, q, s, z)
    dy = torch.randn_like(y)
    y.backward(dy)
    yr.backward(dy)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)


def test_opcheck():
    q8, s8 = _int8(12, 128, "cpu")
    q4, s4, z4 = _int4(12, 128, "cpu")
    quick = ("test_schema", "test_faketensor", "test_autograd_registration")
    for m in (1, 20):                        # the streaming kernel and the tiled prefill path
        x = torch.randn(m, 128, dtype=torch.bfloat16)
        torch.library.opcheck(torch.ops.exaone_ext.linear_int8, (x, q8, s8), test_utils=quick)
        torch.library.opcheck(torch.ops.exaone_ext.linear_int4, (x, q4, s4, z4, 128), test_utils=quick)


@pytest.mark.slow
def test_opcheck_all_utils():
    q4, s4, z4 = _int4(12, 128, "cpu")
    x = torch.randn(2, 128, requires_grad=True)
    torch.library.opcheck(torch.ops.exaone_ext.linear_int4, (x, q4, s4, z4, 128))   # all checks, with autograd


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 256)
    q8, s8 = _int8(12, 256, "cpu")
    q4, s4, z4 = _int4(12, 256, "cpu")
    with pytest.raises(TypeError, match=r"linear_int8: 'qweight' must be int8, got Float"):
        ops.linear_int8(x, q8.float(), s8)
    with pytest.raises(ValueError, match=r"linear_int8: the last dimension of 'x'.*in_features of 'qweight'"):
        ops.linear_int8(torch.randn(2, 255), q8, s8)
    with pytest.raises(ValueError, match=r"linear_int8: 'scales' must have shape \[out_features\]"):
        ops.linear_int8(x, q8, s8[:5])
    with pytest.raises(TypeError, match=r"linear_int8: 'scales' must be float32 or x's dtype"):
        ops.linear_int8(x, q8, s8.half())
    with pytest.raises(TypeError, match=r"linear_int8: 'x' must be float32, bfloat16 or float16"):
        ops.linear_int8(x.double(), q8, s8)
    with pytest.raises(TypeError, match=r"linear_int8: 'scales' must be a torch.Tensor"):
        ops.linear_int8(x, q8, [1.0])
    with pytest.raises(TypeError, match=r"linear_int4: 'qweight' must be uint8"):
        ops.linear_int4(x, q4.to(torch.int8), s4, z4)
    with pytest.raises(TypeError, match=r"linear_int4: 'zeros' must be uint8"):
        ops.linear_int4(x, q4, s4, z4.float())
    with pytest.raises(ValueError, match=r"linear_int4: in_features \(the last dimension of 'x', 200\) must be "
                                         r"a multiple of group_size \(128\)"):
        ops.linear_int4(torch.randn(2, 200), torch.zeros(12, 100, dtype=torch.uint8), s4, z4)
    with pytest.raises(ValueError, match=r"linear_int4: 'group_size' must be a positive multiple of 32, got 100"):
        ops.linear_int4(x, q4, s4, z4, 100)
    with pytest.raises(ValueError, match=r"linear_int4: 'qweight' must have in_features / 2 = 128 columns"):
        ops.linear_int4(x, q4[:, :64], s4, z4)
    with pytest.raises(ValueError, match=r"linear_int4: 'scales' must have shape \[out_features, in_features / "
                                         r"group_size\] = \[12, 4\]"):
        ops.linear_int4(x, q4, s4, z4, 64)
    with pytest.raises(TypeError, match=r"linear_int4: 'group_size' must be an int"):
        ops.linear_int4(x, q4, s4, z4, 128.0)


# ---- linear_int8_cat / linear_int4_cat: several quantized weights of one input in one call ------------
def _cat_weights(fmt, k, device, outs=(130, 1, 64, 33), scale_dtype=torch.float32, group=128):
    """Weights of several sizes (not multiples of the kernels' block of 4, one of a single row)."""
    make = (lambda n: _int8(n, k, device, scale_dtype)) if fmt == "int8" else (lambda n: _int4(n, k, device, group, scale_dtype))
    return [make(n) for n in outs]


def _cat_call(fn_ops, fmt, x, ws, group=128):
    if fmt == "int8":
        return fn_ops.linear_int8_cat(x, [q for q, _ in ws], [s for _, s in ws])
    return fn_ops.linear_int4_cat(x, [w[0] for w in ws], [w[1] for w in ws], [w[2] for w in ws], group)


def _single_call(fmt, x, w, group=128):
    return ops.linear_int8(x, *w) if fmt == "int8" else ops.linear_int4(x, *w, group)


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cat_equals_separate_calls(m, fmt, dtype, device, cpu_isa):
    """Each weight's columns are exactly what the single op gives for it alone (streaming and tiled
    rows, every CPU variant), and the whole meets the error rule against float64."""
    k = 256
    ws = _cat_weights(fmt, k, device, scale_dtype=dtype if m == 2 else torch.float32)
    x = torch.randn(m, k, device=device).to(dtype)
    out = _cat_call(ops, fmt, x, ws)
    assert out.shape == (m, 228) and out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out, torch.cat([_single_call(fmt, x, w) for w in ws], -1))
    w64 = torch.cat([q.double() * s.double()[:, None] if fmt == "int8"
                     else reference.dequantize_int4(q, s.double(), *rest, 128, torch.float64)
                     for q, s, *rest in ws])
    _check(out, x, w64, _cat_call(reference, fmt, x, ws))


@pytest.mark.parametrize("isa", INT_DOT_ISAS)
@pytest.mark.parametrize("m", [1, 3, 16])
def test_cat_integer_paths(isa, m, int_dot):
    """The integer paths (x quantized once for all the weights) on each variant: the same columns as
    the single ops."""
    before = _use_isa(isa)
    try:
        for fmt in ("int8", "int4"):
            ws = _cat_weights(fmt, 384, "cpu", outs=(40, 9, 24), scale_dtype=torch.bfloat16)
            x = torch.randn(m, 384).bfloat16()
            assert torch.equal(_cat_call(ops, fmt, x, ws), torch.cat([_single_call(fmt, x, w) for w in ws], -1))
    finally:
        exaone_ext.set_cpu_isa("auto")
        _C._set_cpu_avx512vnni(before)


@pytest.mark.parametrize("brgemm", [1, 0], ids=["brgemm", "no-brgemm"])
@pytest.mark.parametrize("m", [16, 40, 64])
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_bf16_rows_through_brgemm_or_tiles(fmt, m, brgemm):
    """16-64 rows of bfloat16 x: dequantised tiles of 32 weight rows multiplied by oneDNN's brgemm
    where it runs (the default), else the streaming kernel (16) or 8 MiB tiles through at::mm; both
    meet the error rule, across weights of ragged sizes (the cat op) and k past one brgemm depth."""
    before = _C._set_linear_brgemm(brgemm)
    try:
        k = 1280
        ws = _cat_weights(fmt, k, "cpu", outs=(70, 1, 33), scale_dtype=torch.bfloat16)
        x = torch.randn(m, k).bfloat16()
        out = _cat_call(ops, fmt, x, ws)
        assert torch.equal(out, torch.cat([_single_call(fmt, x, w) for w in ws], -1))
        w64 = torch.cat([q.double() * s.double()[:, None] if fmt == "int8"
                         else reference.dequantize_int4(q, s.double(), *rest, 128, torch.float64)
                         for q, s, *rest in ws])
        _check(out, x, w64, _cat_call(reference, fmt, x, ws))
    finally:
        _C._set_linear_brgemm(before)


@pytest.mark.parametrize("m", [0, 1, 3, 20])
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_cat_odd_inputs(fmt, m):
    """x a strided view at an offset, NaN / inf in it, a weight of zero rows in the lists, and no
    rows at all: the same columns as the single ops (NaN where they have NaN)."""
    k = 256
    ws = _cat_weights(fmt, k, "cpu", outs=(20, 0, 9), scale_dtype=torch.bfloat16)
    base = torch.randn(2 * m + 1, k + 8).bfloat16()
    x = base[1::2, 3:3 + k]                                   # rows every other one, from column 3
    if m:
        x[0, 5], x[m - 1, 100] = float("nan"), float("inf")
    out = _cat_call(ops, fmt, x, ws)
    assert out.shape == (m, 29)
    torch.testing.assert_close(out, torch.cat([_single_call(fmt, x, w) for w in ws], -1), rtol=0, atol=0,
                               equal_nan=True)
    if m:
        assert out[0].isnan().all()


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_cat_gradient_in_x(fmt, device):
    ws = _cat_weights(fmt, 256, device, outs=(24, 8))
    x = torch.randn(2, 3, 256, device=device, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    y, yr = _cat_call(ops, fmt, x, ws), _cat_call(reference, fmt, xr, ws)
    dy = torch.randn_like(y)
    y.backward(dy)
    yr.backward(dy)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)


def test_cat_opcheck():
    w8 = _cat_weights("int8", 128, "cpu", outs=(12, 5))
    w4 = _cat_weights("int4", 128, "cpu", outs=(12, 5))
    quick = ("test_schema", "test_faketensor", "test_autograd_registration")
    for m in (1, 20):
        x = torch.randn(m, 128, dtype=torch.bfloat16)
        torch.library.opcheck(torch.ops.exaone_ext.linear_int8_cat, (x, [q for q, _ in w8], [s for _, s in w8]),
                              test_utils=quick)
        torch.library.opcheck(torch.ops.exaone_ext.linear_int4_cat,
                              (x, [w[0] for w in w4], [w[1] for w in w4], [w[2] for w in w4], 128), test_utils=quick)


def test_cat_bad_inputs_name_the_weight():
    x = torch.randn(2, 256)
    (q8a, s8a), (q8b, s8b) = _cat_weights("int8", 256, "cpu", outs=(12, 4))
    (q4a, s4a, z4a), (q4b, s4b, z4b) = _cat_weights("int4", 256, "cpu", outs=(12, 4))
    with pytest.raises(ValueError, match=r"linear_int8_cat: 'qweights' must hold at least one tensor, got none"):
        ops.linear_int8_cat(x, [], [])
    with pytest.raises(ValueError, match=r"linear_int8_cat: 'scales' must hold as many tensors as 'qweights' \(2\), "
                                         r"got 1"):
        ops.linear_int8_cat(x, [q8a, q8b], [s8a])
    with pytest.raises(ValueError, match=r"linear_int8_cat: weight 1 of the lists: 'scales' must have shape "
                                         r"\[out_features\]"):
        ops.linear_int8_cat(x, [q8a, q8b], [s8a, s8a])
    with pytest.raises(TypeError, match=r"linear_int8_cat: weight 0 of the lists: 'qweight' must be int8"):
        ops.linear_int8_cat(x, [q8a.float(), q8b], [s8a, s8b])
    with pytest.raises(TypeError, match=r"linear_int8_cat: 'qweights' must be a list or tuple of tensors, got Tensor"):
        ops.linear_int8_cat(x, q8a, [s8a])
    with pytest.raises(TypeError, match=r"linear_int8_cat: 'scales\[1\]' must be a torch.Tensor"):
        ops.linear_int8_cat(x, [q8a, q8b], [s8a, 1.0])
    with pytest.raises(ValueError, match=r"linear_int4_cat: 'zeros' must hold as many tensors as 'qweights' \(2\), "
                                         r"got 3"):
        ops.linear_int4_cat(x, [q4a, q4b], [s4a, s4b], [z4a, z4b, z4b])
    with pytest.raises(ValueError, match=r"linear_int4_cat: weight 1 of the lists: 'qweight' must have in_features / 2"):
        ops.linear_int4_cat(x, [q4a, q4b[:, :64]], [s4a, s4b], [z4a, z4b])
    with pytest.raises(ValueError, match=r"linear_int4_cat: weight 0 of the lists: 'group_size' must be a positive "
                                         r"multiple of 32, got 100"):
        ops.linear_int4_cat(x, [q4a, q4b], [s4a, s4b], [z4a, z4b], 100)
    with pytest.raises(TypeError, match=r"linear_int4_cat: 'group_size' must be an int"):
        ops.linear_int4_cat(x, [q4a, q4b], [s4a, s4b], [z4a, z4b], 128.0)


def test_quantizers_round_to_nearest():
    w = torch.randn(33, 256)
    q, s = reference.quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (33,)
    err = (reference.dequantize_int8(q, s) - w).abs()
    assert (err <= s[:, None] / 2 + 1e-7).all()
    assert (q.abs().amax(dim=1) == 127).all()
    q4, s4, z4 = reference.quantize_int4(w, 64)
    assert q4.shape == (33, 128) and s4.shape == (33, 4) and z4.dtype == torch.uint8
    deq = reference.dequantize_int4(q4, s4, z4, 64)
    groups = w.reshape(33, 4, 64)
    bound = (s4[..., None] / 2 + (groups.amin(-1, keepdim=True) - (-z4.float() * s4)[..., None]).abs())
    assert ((deq.reshape(33, 4, 64) - groups).abs() <= bound + 1e-6).all()
    vals = torch.randint(0, 16, (5, 96), dtype=torch.uint8)
    assert torch.equal(reference.unpack_int4(reference.pack_int4(vals)), vals)
    packed = reference.pack_int4(vals)        # byte j of a 32-block: element j low, element 16 + j high
    assert int(packed[0, 3]) == int(vals[0, 3]) | (int(vals[0, 19]) << 4)
    assert int(packed[1, 16 + 2]) == int(vals[1, 32 + 2]) | (int(vals[1, 48 + 2]) << 4)


def _awq_pack(values):
    """uint8 [rows, cols] of 4-bit values -> int32 [rows, cols / 8], written from the format's
    description: nibble j of word c holds column 8c + (0, 2, 4, 6, 1, 3, 5, 7)[j]."""
    order = (0, 2, 4, 6, 1, 3, 5, 7)
    rows, cols = values.shape
    out = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for c in range(cols // 8):
        for j in range(8):
            out[:, c] |= values[:, 8 * c + order[j]].long() << (4 * j)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)   # the 32 bits as a signed word


def _awq_unpack_by_loops(words):
    """int32 [rows, cols / 8] -> [[value]] by plain loops over words and nibbles."""
    order = (0, 2, 4, 6, 1, 3, 5, 7)
    rows, n = words.shape
    out = [[0] * (8 * n) for _ in range(rows)]
    for r in range(rows):
        for c in range(n):
            word = int(words[r, c]) & 0xFFFFFFFF
            for j in range(8):
                out[r][8 * c + order[j]] = (word >> (4 * j)) & 15
    return torch.tensor(out, dtype=torch.float64)


def test_awq_conversion_matches_the_format():
    n_in, n_out, group = 256, 24, 128
    qv = torch.randint(0, 16, (n_in, n_out), dtype=torch.uint8)        # AWQ: transposed, [in, out]
    zv = torch.randint(0, 16, (n_in // group, n_out), dtype=torch.uint8)
    scales = (torch.rand(n_in // group, n_out) / 10 + 0.01).half()
    qweight, qzeros = _awq_pack(qv), _awq_pack(zv)
    assert qweight.dtype == torch.int32 and (qweight < 0).any()        # top nibbles set the sign bit
    # independent dequantisation from the description
    q_loop, z_loop = _awq_unpack_by_loops(qweight), _awq_unpack_by_loops(qzeros)
    assert torch.equal(q_loop, qv.double())
    g = torch.arange(n_in) // group
    w_ref = ((q_loop - z_loop[g]) * scales.double()[g]).t()             # [out, in]
    q, s, z = awq_to_int4(qweight, qzeros, scales, group)
    assert q.shape == (n_out, n_in // 2) and s.shape == (n_out, n_in // group) and z.shape == s.shape
    torch.testing.assert_close(reference.dequantize_int4(q, s.double(), z, group, torch.float64), w_ref,
                               rtol=0, atol=0)
    x = torch.randn(3, n_in)
    torch.testing.assert_close(ops.linear_int4(x, q, s, z, group), F.linear(x.double(), w_ref).float(),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="scales must be"):
        awq_to_int4(qweight, qzeros, scales[:1], group)


@pytest.mark.parametrize("m", [2, 3, 7])
def test_int8_special_values_several_rows(m, cpu_isa):
    """inf / NaN in x through the several-row int8 tiles (and the k tail past the last 32): the same
    non-finite outputs as float64 on the dequantised weight."""
    torch.manual_seed(0)
    q, s = reference.quantize_int8(torch.randn(6, 72))
    x = torch.randn(m, 72).bfloat16()
    x[0, 3], x[1, 9], x[m - 1, 70] = float("inf"), float("nan"), float("-inf")
    out = ops.linear_int8(x, q, s)
    ref = x.double() @ (q.double() * s.double()[:, None]).T
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.equal(torch.isinf(out), torch.isinf(ref))
    assert torch.equal(out.isposinf(), ref.isposinf())
