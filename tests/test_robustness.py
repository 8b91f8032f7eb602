"""Bad input raises a message with its numbers, odd-but-valid input gives the reference's answer, and
the build links the C++ runtime the way torch does. Each case here was once a crash, a silently wrong
answer or a message without its numbers."""
from __future__ import annotations

import math
import re

import pytest
import torch

import exaone_ext
from exaone_ext import ops
from exaone_ext.ops import reference

from conftest import CPU_VARIANTS


# ---- the C++ runtime ------------------------------------------------------------------------------

def _loaded_libstdcxx() -> set[str]:
    with open("/proc/self/maps") as f:
        return {line.split()[-1] for line in f if "/libstdc++.so" in line}


def test_build_info_reports_shared_cxx_runtime():
    rt = exaone_ext.build_info()["cxx_runtime"]
    assert set(rt) >= {"libstdc++", "path"}
    # A static copy inside _C makes every number vanish from the ops' messages (or crashes).
    assert rt["libstdc++"] == "shared", rt
    assert rt["needed"] is True
    assert "libstdc++.so" in rt["path"]
    if torch.__file__ and _loaded_libstdcxx():
        import os
        loaded = {os.path.realpath(p) for p in _loaded_libstdcxx()}
        assert os.path.realpath(rt["path"]) in loaded, (rt, loaded)


def _message(fn) -> str:
    with pytest.raises((ValueError, TypeError)) as e:
        fn()
    return str(e.value)


def test_error_messages_carry_their_numbers():
    """Messages that format numbers in C++; a broken C++ runtime drops everything after the first one."""
    q, k = torch.randn(1, 2, 4, 64), torch.randn(1, 2, 3, 64)
    msg = _message(lambda: ops.flash_attn(q, k, k))
    assert "(4)" in msg and "(3)" in msg, msg

    msg = _message(lambda: torch.ops.exaone_ext.swiglu(torch.randn(2, 8), torch.randn(2, 9)))
    assert "[2, 8]" in msg and "[2, 9]" in msg, msg

    kc = torch.randn(1, 8, 1, 64)
    msg = _message(lambda: ops.flash_attn_with_kvcache(torch.randn(1, 1, 1, 64), kc, kc.clone(),
                                                       torch.tensor([10], dtype=torch.int32)))
    assert "= 10" in msg and "max_seq = 8" in msg, msg

    cos, sin = ops.rope_cos_sin(64, 16)
    msg = _message(lambda: ops.apply_rope(torch.randn(1, 1, 2, 64), torch.randn(1, 1, 1, 64), cos, sin,
                                          torch.tensor([[100]])))
    assert "100" in msg and "16 positions" in msg and "15" in msg, msg

    msg = _message(lambda: ops.rms_norm(torch.randn(3, 0), torch.randn(0)))
    assert "[3, 0]" in msg, msg

    msg = _message(lambda: ops.linear(torch.randn(2, 5), torch.randn(7, 6)))
    assert "5 != 6" in msg, msg

    msg = _message(lambda: ops.flash_attn_varlen(torch.randn(5, 2, 64), torch.randn(5, 2, 64),
                                                 torch.randn(5, 2, 64), torch.tensor([0, 3, 2], dtype=torch.int32),
                                                 torch.tensor([0, 3, 5], dtype=torch.int32), 5, 5))
    assert "[2] = 2 < [1] = 3" in msg, msg


# ---- argument types: the op and the argument are named ---------------------------------------------

@pytest.mark.parametrize("scale", ["abc", [0.1], float("nan"), True])
def test_softmax_scale_messages(scale):
    q = torch.randn(1, 2, 2, 64)
    for call, op in ((lambda: ops.flash_attn(q, q, q, softmax_scale=scale), "flash_attn"),
                     (lambda: ops.flash_attn_with_kvcache(q[:, :1], q, q.clone(), torch.tensor([1], dtype=torch.int32),
                                                          softmax_scale=scale), "flash_attn_with_kvcache")):
        msg = _message(call)
        assert f"exaone_ext.{op}" in msg and "softmax_scale" in msg, msg


def test_max_seqlen_message():
    x = torch.randn(3, 1, 64)
    cu = torch.tensor([0, 3], dtype=torch.int32)
    with pytest.raises(TypeError, match=r"exaone_ext\.flash_attn_varlen: 'max_seqlen_q' must be an int"):
        ops.flash_attn_varlen(x, x, x, cu, cu, [3], 3)
    with pytest.raises(TypeError, match=r"exaone_ext\.flash_attn_varlen: 'max_seqlen_k' must be an int"):
        ops.flash_attn_varlen(x, x, x, cu, cu, 3, 3.0)


def test_rope_cos_sin_messages():
    with pytest.raises(ValueError, match=r"exaone_ext\.rope_cos_sin: 'device'.*'nope'"):
        ops.rope_cos_sin(64, 8, device="nope")
    with pytest.raises(TypeError, match=r"exaone_ext\.rope_cos_sin: 'device'"):
        ops.rope_cos_sin(64, 8, device=3.5)
    with pytest.raises(TypeError, match=r"exaone_ext\.rope_cos_sin: 'theta' must be a number"):
        ops.rope_cos_sin(64, 8, theta="abc")
    with pytest.raises(ValueError, match=r"exaone_ext\.rope_cos_sin: 'theta' must be finite"):
        ops.rope_cos_sin(64, 8, theta=float("inf"))


# ---- attention: empty rows, strided offsets, empty tensors, NaN --------------------------------------

@pytest.fixture(params=CPU_VARIANTS)
def variant(request):
    from exaone_ext import _C
    before_isa, before_bf16 = exaone_ext.get_cpu_isa(), _C._set_cpu_avx512bf16(request.param == "avx512bf16")
    exaone_ext.set_cpu_isa("avx512" if request.param == "avx512bf16" else request.param)
    yield request.param
    exaone_ext.set_cpu_isa(before_isa)
    _C._set_cpu_avx512bf16(before_bf16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kvcache_all_rows_empty_no_new_tokens(variant, dtype, attn_decode):
    """Used to divide by zero (SIGFPE) splitting an empty cache; every row sees no key: zeros."""
    q = torch.randn(2, 1, 4, 96, dtype=dtype)
    kc, vc = torch.randn(2, 3, 1, 96, dtype=dtype), torch.randn(2, 3, 1, 96, dtype=dtype)
    for causal in (False, True):
        out = ops.flash_attn_with_kvcache(q, kc, vc, torch.tensor([0, 0], dtype=torch.int32), causal=causal)
        assert torch.equal(out, torch.zeros_like(q))
        ref = reference.flash_attn_with_kvcache(q, kc, vc, torch.tensor([0, 0], dtype=torch.int32), causal=causal)
        assert torch.equal(ref, torch.zeros_like(q))


def test_kvcache_empty_row_beside_a_long_one(variant, attn_decode):
    q = torch.randn(2, 1, 2, 64)
    kc, vc = torch.randn(2, 2048, 1, 64), torch.randn(2, 2048, 1, 64)
    lens = torch.tensor([0, 2000], dtype=torch.int32)
    out = ops.flash_attn_with_kvcache(q, kc, vc, lens)
    ref = reference.flash_attn_with_kvcache(q.double(), kc.double(), vc.double(), lens).float()
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


def test_varlen_strided_cu_seqlens(variant):
    """A strided cu_seqlens view used to be read as if dense (output off by 3.5, gradients wrong)."""
    torch.manual_seed(0)
    cu = torch.tensor([0, 20, 21], dtype=torch.int32).repeat_interleave(2)[::2]
    assert not cu.is_contiguous()
    q = torch.randn(21, 2, 64, dtype=torch.float64, requires_grad=True)
    k = torch.randn(21, 1, 64, dtype=torch.float64, requires_grad=True)
    v = torch.randn(21, 1, 64, dtype=torch.float64, requires_grad=True)
    out, lse = ops.flash_attn_varlen(q, k, v, cu, cu, 20, 20, return_lse=True)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    cc = cu.contiguous()
    out2, lse2 = ops.flash_attn_varlen(q, k, v, cc, cc, 20, 20, return_lse=True)
    grads2 = torch.autograd.grad(out2.square().sum(), (q, k, v))
    ref = reference.flash_attn_varlen(q, k, v, cc, cc, 20, 20)
    torch.testing.assert_close(out, out2, atol=0, rtol=0)
    torch.testing.assert_close(lse, lse2, atol=0, rtol=0)
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # the raw operator too (the public function passes the view through)
    raw = torch.ops.exaone_ext.flash_attn_varlen_fwd(q.detach(), k.detach(), v.detach(), cu, cu, 20, 20, True, 0.125)
    torch.testing.assert_close(raw[0], reference.flash_attn_varlen(q.detach(), k.detach(), v.detach(), cc, cc, 20, 20,
                                                                   softmax_scale=0.125))


def test_empty_tensors_with_odd_strides():
    """Zero-size tensors with a non-unit last stride have nothing to read: accepted."""
    q = torch.randn(2, 64, 3, 0).permute(0, 3, 2, 1)  # [2, 0, 3, 64], last stride 0
    k = torch.randn(2, 64, 1, 5).permute(0, 3, 2, 1)[:, :0]
    assert q.numel() == 0 and q.stride(-1) != 1
    out, lse = ops.flash_attn(q, k, k, return_lse=True)
    assert out.shape == q.shape and lse.shape == (2, 3, 0)
    out = ops.flash_attn(torch.randn(2, 1, 3, 64), k, k, causal=False)  # no keys: zeros
    assert torch.equal(out, torch.zeros_like(out))
    qv = torch.randn(64, 2, 0).permute(2, 1, 0)  # [0, 2, 64]
    cu = torch.tensor([0, 0], dtype=torch.int32)
    assert ops.flash_attn_varlen(qv, qv[:, :1], qv[:, :1], cu, cu, 0, 0).shape == (0, 2, 64)
    kc = torch.randn(64, 1, 4, 0).permute(3, 2, 1, 0)  # [0, 4, 1, 64], last stride 4
    assert ops.flash_attn_with_kvcache(torch.randn(0, 1, 2, 64), kc, kc.clone(),
                                       torch.zeros(0, dtype=torch.int32)).shape == (0, 1, 2, 64)
    # gradients of an empty attention
    q = torch.randn(1, 64, 2, 0).permute(0, 3, 2, 1).requires_grad_()
    k = torch.randn(1, 3, 1, 64, requires_grad=True)
    ops.flash_attn(q, k, k).sum().backward()
    assert torch.equal(k.grad, torch.zeros_like(k))


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_nan_in_visible_key_long_cache(variant, attn_decode, low):
    """A NaN in a visible key came out finite, its whole 512-key split dropped."""
    torch.manual_seed(0)
    kc, vc = torch.randn(1, 4096, 1, 64), torch.randn(1, 4096, 1, 64)
    kc[0, 7, 0, 3] = float("nan")
    q = torch.randn(1, 1, 1, 64)
    lens = torch.tensor([4000], dtype=torch.int32)
    out = ops.flash_attn_with_kvcache(q, kc, vc, lens)
    assert out.isnan().all(), out
    ref = reference.flash_attn_with_kvcache(q, kc, vc, lens)
    assert ref.isnan().all()
    # 16-bit caches (bfloat16: the AVX512-BF16 decode kernel where the CPU has it)
    out = ops.flash_attn_with_kvcache(q.to(low), kc.to(low), vc.to(low), lens)
    assert out.isnan().all(), out
    # a NaN past the row's length is not part of the input
    kc[0, 7, 0, 3] = 1.0
    kc[0, 4000, 0, 0] = float("nan")
    assert ops.flash_attn_with_kvcache(q, kc, vc, lens).isfinite().all()


@pytest.mark.parametrize("seq_k", [5, 300, 1500])
def test_nan_key_with_zero_values(variant, seq_k):
    """softmax with a NaN score is NaN: lse NaN and out NaN, as plain PyTorch attention gives."""
    q = torch.randn(1, 2, 2, 64)
    k, v = torch.randn(1, seq_k, 1, 64), torch.zeros(1, seq_k, 1, 64)
    k[0, 0, 0, 5] = float("nan")
    out, lse = ops.flash_attn(q, k, v, return_lse=True)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2).expand(1, 2, seq_k, 64),
                                                            v.transpose(1, 2).expand(1, 2, seq_k, 64))
    assert sdpa.isnan().all()
    assert out.isnan().all() and lse.isnan().all(), (out, lse)
    ref_out, ref_lse = reference.flash_attn(q, k, v, return_lse=True)
    assert ref_out.isnan().all() and ref_lse.isnan().all()
    lens = torch.tensor([seq_k], dtype=torch.int32)
    assert ops.flash_attn_with_kvcache(q[:, :1], k, v, lens).isnan().all()


def test_nan_in_value_propagates_through_split(variant, attn_decode):
    kc, vc = torch.randn(1, 3000, 1, 64), torch.randn(1, 3000, 1, 64)
    vc[0, 2500, 0, 1] = float("nan")
    out = ops.flash_attn_with_kvcache(torch.randn(1, 1, 2, 64), kc, vc, torch.tensor([2900], dtype=torch.int32))
    assert out[..., 1].isnan().all() and out[..., 0].isfinite().all()


# ---- linear with empty weights --------------------------------------------------------------------

@pytest.mark.parametrize("shape_x, shape_w", [((3, 64), (0, 64)), ((2, 3, 64), (0, 64)), ((3, 0), (5, 0)),
                                              ((0, 8), (4, 8)), ((8,), (0, 8))])
def test_linear_backward_with_empty_operands(shape_x, shape_w):
    """A zero-row weight (or zero-size x) used to fail in backward: reshape(-1, 0) of 0 elements."""
    x = torch.randn(*shape_x, dtype=torch.float64, requires_grad=True)
    w = torch.randn(*shape_w, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(2, shape_w[1], dtype=torch.float64, requires_grad=True)
    for fn, ref in ((ops.linear, reference.linear), (ops.linear_cat, reference.linear_cat)):
        args = (x, w) if fn is ops.linear else (x, [w, w2])
        rargs = (x, w) if fn is ops.linear else (x, [w, w2])
        y, y_ref = fn(*args), ref(*rargs)
        torch.testing.assert_close(y, y_ref)
        dy = torch.randn_like(y)
        inputs = (x, w) if fn is ops.linear else (x, w, w2)
        for a, b in zip(torch.autograd.grad(y, inputs, dy), torch.autograd.grad(y_ref, inputs, dy)):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b)


# ---- swiglu at infinite gates ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [3, 8, 17, 1000])
def test_swiglu_infinite_gate_as_pytorch(variant, dtype, n):
    """silu(-inf) came out -inf or +inf for 16-bit dtypes (and -inf on the scalar variant): the clamped
    sigmoid stayed a tiny nonzero number. PyTorch gives -inf * 0 = NaN; silu(+inf) = +inf."""
    gate, up = torch.randn(2, n).to(dtype), torch.randn(2, n).to(dtype)
    gate[0, -1], gate[1, n // 2] = -math.inf, math.inf
    out = ops.swiglu(gate, up)
    ref = torch.nn.functional.silu(gate.float()) * up.float()
    assert out[0, -1].isnan() and ref[0, -1].isnan()
    assert out[1, n // 2] == ref[1, n // 2].to(dtype)
    fused = ops.swiglu(torch.cat([gate, up], -1))
    assert fused[0, -1].isnan() and fused[1, n // 2] == out[1, n // 2]


# ---- float64 attention is float64 throughout --------------------------------------------------------

@pytest.mark.parametrize("d", [80, 96])
def test_float64_attention_keeps_the_scale_exact(d):
    """The softmax scale went through a float (1/sqrt(80) rounded): float64 results 1e-8 off."""
    q = torch.randn(1, 1, 1, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 1, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 1, d, dtype=torch.float64, requires_grad=True)
    out = ops.flash_attn(q, k, v, causal=False)
    ref = reference.flash_attn(q, k, v, causal=False)
    torch.testing.assert_close(out, ref, atol=1e-13, rtol=1e-12)
    g = torch.randn_like(out)
    # the backward recomputes P from the saved LSE, which is float32 for every dtype: ~1e-7 relative
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-6)
    lens = torch.tensor([2], dtype=torch.int32)
    kv = ops.flash_attn_with_kvcache(q.detach(), k.detach(), v.detach(), lens, causal=False)
    torch.testing.assert_close(kv, ref.detach(), atol=1e-13, rtol=1e-12)


def test_cuda_attention_switches_refuse_bad_modes():
    """The CUDA forward's block-shape switch names its modes (in every build, with or without CUDA)."""
    from exaone_ext import _C
    with pytest.raises(ValueError, match="wide-row mode must be -1"):
        _C._set_cuda_attn_wide_rows(2)
    previous = _C._set_cuda_attn_wide_rows(-1)
    assert previous in (-1, 0, 1) and _C._set_cuda_attn_wide_rows(previous) == -1
