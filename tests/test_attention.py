import math

import pytest
import torch

import exaone_ext
from exaone_ext import ops
from exaone_ext.ops import reference
from conftest import (ATTN_BRGEMM, CUDA, DEVICES, DTYPES, assert_error_within, attention_products_rounded, attention_rounding_bounds,
                      causal_mask, varlen_mask)

_ops = torch.ops.exaone_ext

# (batch, seq_q, seq_k, q_heads, kv_heads, head_dim): seq 1, 17, 97, 128, 1025; head dims 64, 80, 128;
# GQA ratios 1, 4, 8; seq_q < seq_k, and seq_q > seq_k (causal then leaves the first rows empty).
SHAPES = [
    (2, 1, 1, 4, 4, 64),
    (1, 17, 17, 8, 2, 80),
    (2, 97, 97, 8, 1, 128),
    (1, 128, 128, 4, 4, 64),
    (1, 17, 97, 8, 1, 80),
    (2, 97, 17, 4, 1, 64),
    pytest.param((1, 1025, 1025, 4, 1, 80), marks=pytest.mark.slow),  # the tiling of 128 covers the blocks
]


def _qkv(b, sq, sk, hq, hk, d, dtype, device="cpu"):
    q = torch.randn(b, sq, hq, d, device=device).to(dtype)
    k = torch.randn(b, sk, hk, d, device=device).to(dtype)
    v = torch.randn(b, sk, hk, d, device=device).to(dtype)
    return q, k, v


def _assert_lse(lse, ref64, ref_lp, name="lse", k=1):
    finite = torch.isfinite(ref64)
    assert torch.equal(torch.isfinite(lse), finite), f"{name}: -inf pattern differs from the reference"
    assert torch.all(lse[~finite] == float("-inf"))
    assert_error_within(lse[finite], ref64[finite].double(), ref_lp[finite].float(), name, k=k)


def _check_dense(shape, dtype, causal, device, scale=None, backward=True):
    q, k, v = _qkv(*shape, dtype, device)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = ops.flash_attn(*leaves, causal=causal, softmax_scale=scale, return_lse=True)
    l64 = [x.double().clone().requires_grad_() for x in (q, k, v)]  # a copy also when x is float64
    ref64, lse64 = reference.flash_attn(*l64, causal=causal, softmax_scale=scale, return_lse=True)
    llp = [x.clone().requires_grad_() for x in (q, k, v)]
    ref_lp, lse_lp = reference.flash_attn(*llp, causal=causal, softmax_scale=scale, return_lse=True)
    assert out.dtype == dtype and out.shape == q.shape and out.is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    # reductions over the keys (out, lse, dq) and over the queries of a kv head (dk, dv)
    red = max(k.shape[1], q.shape[1] * q.shape[2] // k.shape[2])
    keys = k.shape[1]
    if scale is not None:  # large logits: their float32 error (a sum over head_dim) carries through exp
        keys, red = keys * q.shape[-1], red * q.shape[-1]
    dout = torch.randn_like(out)
    # the roundings flash attention makes by design (D from the stored output; P and dS rounded into
    # 16-bit tile products where the kernel does that): conftest.attention_rounding_bounds
    extra = attention_rounding_bounds(q, k, v, dout, out, scale or q.shape[-1] ** -0.5,
                                      causal_mask(q.shape[1], k.shape[1], causal, q.shape[0]), dtype,
                                      products_rounded=attention_products_rounded(device, dtype))
    assert_error_within(out, ref64, ref_lp, "out", k=keys, extra=extra["out"])
    _assert_lse(lse, lse64, lse_lp, k=keys)
    if not backward:
        return
    out.backward(dout)
    ref64.backward(dout.double())
    ref_lp.backward(dout)
    for ours, r64, rlp, name in zip(leaves, l64, llp, ("dq", "dk", "dv")):
        assert_error_within(ours.grad, r64.grad, rlp.grad, name, k=red, extra=extra[name])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)) if isinstance(s, tuple) else None)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
def test_forward_backward_matches_reference(shape, dtype, causal, device):
    _check_dense(shape, dtype, causal, device)


@pytest.mark.parametrize("shape", [(1, 33, 70, 8, 2, 128), (2, 70, 33, 4, 1, 96)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_cpu_variant(shape, dtype, cpu_variant):
    _check_dense(shape, dtype, True, "cpu")


@pytest.mark.parametrize("d", [96, 256])
def test_other_head_dims_and_scale(d):
    _check_dense((1, 40, 50, 6, 2, d), torch.float32, True, "cpu", scale=0.3)
    _check_dense((1, 40, 50, 6, 2, d), torch.bfloat16, False, "cpu", scale=-0.05)


@pytest.mark.parametrize("shape", [s for s in SHAPES if isinstance(s, tuple)] + [(1, 200, 300, 8, 2, 96)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [True, False])
def test_bf16_engines(shape, causal, attn_engine):
    # bfloat16 forward and backward with each engine of the tile products (the kernels' vdpbf16ps, or
    # oneDNN's brgemm: AMX where the CPU has it), on every shape above and one wider than a tile
    if exaone_ext.build_info()["cpu_attention_bf16_products"] == "float32":
        pytest.skip("no bfloat16 tile products on this CPU (float32 tiles: the other tests cover them)")
    _check_dense(shape, torch.bfloat16, causal, "cpu")
    lens_q, lens_k = [5, 0, 70, 1], [9, 3, 64, 1]
    q, k, v, cu_q, cu_k = _packed(lens_q, lens_k, 8, 2, 80, torch.bfloat16)
    out = ops.flash_attn_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal)
    for i in range(len(lens_q)):
        a, b, c = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i])
        want = ops.flash_attn(q[None, a:b], k[None, c:int(cu_k[i + 1])], v[None, c:int(cu_k[i + 1])], causal=causal)[0]
        assert torch.equal(out[a:b], want), "varlen differs from its sequences run alone"


def test_float64_backward_to_float64_precision():
    # the forward saves the log-sum-exp in float32; the float64 backward recomputes it, or P = exp(S -
    # lse) would carry float32's relative error (6e-8 in dv for one query and one key)
    for shape, scale in (((1, 1, 1, 1, 1, 64), 1.0), ((2, 17, 23, 4, 2, 80), 1.0), ((1, 40, 40, 8, 2, 64), None)):
        _check_dense(shape, torch.float64, True, "cpu", scale=scale)


def test_non_contiguous_inputs(device):
    # q, k, v as head slices of one fused projection (strided rows and heads), and a transposed q
    b, s, hq, hk, d = 2, 37, 8, 2, 64
    qkv = torch.randn(b, s, hq + 2 * hk, d, device=device)
    q, k, v = qkv[:, :, :hq], qkv[:, :, hq:hq + hk], qkv[:, :, hq + hk:]
    torch.testing.assert_close(ops.flash_attn(q, k, v), reference.flash_attn(q, k, v))
    qt = torch.randn(b, s, hq, d, device=device).transpose(1, 2).contiguous().transpose(1, 2)  # [b, s, h, d], strided
    torch.testing.assert_close(ops.flash_attn(qt, k, v, causal=False), reference.flash_attn(qt, k, v, causal=False))
    qd = torch.randn(b, s, hq, d, device=device).transpose(-1, -2).contiguous().transpose(-1, -2)  # last dim strided
    torch.testing.assert_close(ops.flash_attn(qd, k, v), reference.flash_attn(qd, k, v))
    # gradients with an expanded (stride-0) upstream gradient
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    ops.flash_attn(*leaves).sum().backward()
    refl = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    reference.flash_attn(*refl).sum().backward()
    for a, r in zip(leaves, refl):
        torch.testing.assert_close(a.grad, r.grad, atol=2e-5, rtol=1e-4)


def test_empty_and_keyless(device):
    q, k, v = _qkv(0, 5, 5, 4, 2, 64, torch.float32, device)
    out, lse = ops.flash_attn(q, k, v, return_lse=True)
    assert out.shape == q.shape and lse.shape == (0, 4, 5)
    q, k, v = _qkv(2, 0, 5, 4, 2, 64, torch.float32, device)
    assert ops.flash_attn(q, k, v).shape == q.shape
    q, k, v = _qkv(2, 3, 0, 4, 2, 64, torch.float32, device)  # no keys: zeros and lse = -inf
    out, lse = ops.flash_attn(q, k, v, causal=False, return_lse=True)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    q.requires_grad_()
    ops.flash_attn(q, k, v, causal=False).sum().backward()
    assert torch.all(q.grad == 0)


# ---- varlen ----------------------------------------------------------------------------------------

def _packed(lens_q, lens_k, hq, hk, d, dtype, device="cpu", lead=0):
    cu_q = torch.tensor([lead] + list(lead + torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=device)
    cu_k = torch.tensor([lead] + list(lead + torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device=device)
    q = torch.randn(int(cu_q[-1]) + lead, hq, d, device=device).to(dtype)
    k = torch.randn(int(cu_k[-1]) + lead, hk, d, device=device).to(dtype)
    v = torch.randn(int(cu_k[-1]) + lead, hk, d, device=device).to(dtype)
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_matches_reference(dtype, causal, device):
    gen = torch.Generator().manual_seed(1)
    lens_q = torch.randint(1, 301, (7,), generator=gen).tolist()
    lens_q[2] = 0  # an empty sequence
    lens_q[4] = 1
    lens_k = [n if i % 2 else min(300, n + 13) for i, n in enumerate(lens_q)]  # some seq_q < seq_k
    lens_k[5] = 0
    q, k, v, cu_q, cu_k = _packed(lens_q, lens_k, 8, 2, 80, dtype, device)
    mq, mk = max(lens_q), max(lens_k)
    red = max(mk, mq * 4)  # keys per query; queries per kv head (group 4)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = ops.flash_attn_varlen(*leaves, cu_q, cu_k, mq, mk, causal=causal, return_lse=True)
    l64 = [x.double().requires_grad_() for x in (q, k, v)]
    ref64, lse64 = reference.flash_attn_varlen(*l64, cu_q, cu_k, mq, mk, causal=causal, return_lse=True)
    llp = [x.clone().requires_grad_() for x in (q, k, v)]
    ref_lp, lse_lp = reference.flash_attn_varlen(*llp, cu_q, cu_k, mq, mk, causal=causal, return_lse=True)
    dout = torch.randn_like(out)
    extra = {n: t[0] for n, t in attention_rounding_bounds(
        q[None], k[None], v[None], dout[None], out[None], q.shape[-1] ** -0.5, varlen_mask(cu_q, cu_k, causal, q.shape[0], k.shape[0]),
        dtype, products_rounded=attention_products_rounded(device, dtype)).items()}
    assert_error_within(out, ref64, ref_lp, "out", k=mk, extra=extra["out"])
    _assert_lse(lse, lse64, lse_lp, k=mk)
    out.backward(dout)
    ref64.backward(dout.double())
    ref_lp.backward(dout)
    for ours, r64, rlp, name in zip(leaves, l64, llp, ("dq", "dk", "dv")):
        assert_error_within(ours.grad, r64.grad, rlp.grad, name, k=red, extra=extra[name])


def test_varlen_rows_outside_sequences(device):
    # cu_seqlens starting past row 0 and ending before the last row: those rows are zeros / -inf
    q, k, v, cu_q, cu_k = _packed([5, 9], [7, 9], 4, 2, 64, torch.float32, device, lead=3)
    out, lse = ops.flash_attn_varlen(q, k, v, cu_q, cu_k, 9, 9, return_lse=True)
    ref, ref_lse = reference.flash_attn_varlen(q, k, v, cu_q, cu_k, 9, 9, return_lse=True)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)
    assert torch.all(out[:3] == 0) and torch.all(out[-3:] == 0)


def test_varlen_equals_dense_per_sequence(device):
    q, k, v = _qkv(3, 50, 50, 8, 2, 128, torch.bfloat16, device)
    cu = torch.arange(0, 151, 50, dtype=torch.int32, device=device)
    packed = ops.flash_attn_varlen(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, 50, 50)
    assert torch.equal(packed.view_as(q), ops.flash_attn(q, k, v))


# ---- kv cache --------------------------------------------------------------------------------------
# The bfloat16 decode kernel of AVX512-BF16 CPUs rounds the probabilities to bfloat16 for P . V, as a
# cast does: its error rule counts the sum over the keys in bfloat16 (conftest.error_budget). The
# AVX2 decode kernel works in float32 throughout.
P_DTYPE = {torch.bfloat16: torch.bfloat16}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("s_new", [1, 7])
def test_kvcache_matches_reference(dtype, s_new, device):
    b, max_seq, hq, hk, d = 3, 300, 8, 2, 128
    k_cache = torch.randn(b, max_seq, hk, d, device=device).to(dtype)
    v_cache = torch.randn(b, max_seq, hk, d, device=device).to(dtype)
    lens = torch.tensor([0, 130, 291], dtype=torch.int32, device=device)  # ragged, one empty
    q, k_new, v_new = _qkv(b, s_new, s_new, hq, hk, d, dtype, device)
    kc, vc = k_cache.clone(), v_cache.clone()
    out = ops.flash_attn_with_kvcache(q, kc, vc, lens, k_new, v_new)
    kc64, vc64 = k_cache.double(), v_cache.double()
    ref64 = reference.flash_attn_with_kvcache(q.double(), kc64, vc64, lens, k_new.double(), v_new.double())
    kr, vr = k_cache.clone(), v_cache.clone()
    ref_lp = reference.flash_attn_with_kvcache(q, kr, vr, lens, k_new, v_new)
    assert_error_within(out, ref64, ref_lp, "out", k=291 + s_new, acc_dtype=P_DTYPE.get(dtype))
    assert torch.equal(kc, kr) and torch.equal(vc, vr), "the new keys / values were not written at the offsets"
    assert lens.tolist() == [0, 130, 291], "cache_seqlens must not be modified"
    # with the caller's bound on the lengths (on CUDA: no read-back of the lengths): the same result
    for bound in (291, max_seq - s_new):
        kb, vb = k_cache.clone(), v_cache.clone()
        out_b = ops.flash_attn_with_kvcache(q, kb, vb, lens, k_new, v_new, cache_seqlens_max=bound)
        assert torch.equal(out_b, out) and torch.equal(kb, kc) and torch.equal(vb, vc)
    # without new tokens: attends to the first cache_seqlens keys only
    out2 = ops.flash_attn_with_kvcache(q, kc, vc, lens, causal=False)
    torch.testing.assert_close(out2.float(), reference.flash_attn_with_kvcache(q, kc, vc, lens, causal=False).float(),
                               atol=2e-2 if dtype != torch.float32 else 1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d", [80, 128])
def test_kvcache_chunked_prefill(dtype, d, attn_engine):
    """A chunk of 70 new tokens against ragged caches (a chunked prefill: the forward's wide blocks,
    on brgemm's O^T path with V^T of the filled rows where that engine runs). The rows past each
    sequence's length hold NaN: nothing may read them."""
    b, max_seq, hq, hk, s_new = 3, 400, 8, 2, 70
    lens = torch.tensor([0, 129, 301], dtype=torch.int32)
    k_cache = torch.randn(b, max_seq, hk, d).to(dtype)
    v_cache = torch.randn(b, max_seq, hk, d).to(dtype)
    for i, n in enumerate(lens.tolist()):
        k_cache[i, n:] = float("nan")
        v_cache[i, n:] = float("nan")
    q, k_new, v_new = _qkv(b, s_new, s_new, hq, hk, d, dtype, "cpu")
    out = ops.flash_attn_with_kvcache(q, k_cache.clone(), v_cache.clone(), lens, k_new, v_new)
    ref64 = reference.flash_attn_with_kvcache(q.double(), k_cache.double(), v_cache.double(), lens, k_new.double(),
                                              v_new.double())
    ref_lp = reference.flash_attn_with_kvcache(q, k_cache.clone(), v_cache.clone(), lens, k_new, v_new)
    assert_error_within(out, ref64, ref_lp, "out", k=301 + s_new, acc_dtype=P_DTYPE.get(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kvcache_split_kv_long_cache(dtype, attn_decode):
    # one sequence, one kv head, a long cache: the keys are split across threads and combined
    b, max_seq, hq, hk, d = 1, 5000, 4, 1, 64
    k_cache = torch.randn(b, max_seq, hk, d).to(dtype)
    v_cache = torch.randn(b, max_seq, hk, d).to(dtype)
    lens = torch.tensor([4321], dtype=torch.int32)
    q = torch.randn(b, 1, hq, d).to(dtype)
    out = ops.flash_attn_with_kvcache(q, k_cache, v_cache, lens)
    ref64 = reference.flash_attn_with_kvcache(q.double(), k_cache.double(), v_cache.double(), lens)
    ref_lp = reference.flash_attn_with_kvcache(q, k_cache, v_cache, lens)
    assert_error_within(out, ref64, ref_lp, "out", k=4321, acc_dtype=P_DTYPE.get(dtype))


# Few query rows per kv head (seq_new * group <= 8) take a decode kernel on CPUs with AVX2 (all kv
# heads per item, split over key ranges; AVX512-BF16 for bfloat16 where the CPU has it); the
# attn_decode fixture runs every case on the general kernel too, and the two must agree.
@pytest.mark.parametrize("hq,hk,s_new", [(8, 8, 1), (8, 4, 1), (12, 4, 1), (32, 8, 1), (40, 8, 1), (16, 2, 1),
                                         (8, 2, 2), (4, 2, 3)])
@pytest.mark.parametrize("d", [64, 80, 128])
@pytest.mark.parametrize("lens", [[0, 1, 33, 2900], [37], [200], [1500]], ids=["ragged", "short", "short-split", "split"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kvcache_decode_shapes(hq, hk, s_new, d, lens, dtype, attn_decode):
    b, max_seq = len(lens), max(lens) + s_new + 5
    k_cache = torch.randn(b, max_seq, hk, d).to(dtype)
    v_cache = torch.randn(b, max_seq, hk, d).to(dtype)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    q, k_new, v_new = _qkv(b, s_new, s_new, hq, hk, d, dtype, "cpu")
    kc, vc = k_cache.clone(), v_cache.clone()
    out = ops.flash_attn_with_kvcache(q, kc, vc, seqlens, k_new, v_new)
    kr, vr = k_cache.clone(), v_cache.clone()
    ref_lp = reference.flash_attn_with_kvcache(q, kr, vr, seqlens, k_new, v_new)
    ref64 = reference.flash_attn_with_kvcache(q.double(), k_cache.double(), v_cache.double(), seqlens,
                                              k_new.double(), v_new.double())
    acc = P_DTYPE.get(dtype)
    assert_error_within(out, ref64, ref_lp, "out", k=max(lens) + s_new, acc_dtype=acc)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)
    # non-causal over the cache only
    out_nc = ops.flash_attn_with_kvcache(q, kc, vc, seqlens, causal=False)
    ref_nc = reference.flash_attn_with_kvcache(q.double(), kc.double(), vc.double(), seqlens, causal=False)
    assert_error_within(out_nc, ref_nc, reference.flash_attn_with_kvcache(q, kc, vc, seqlens, causal=False), "out",
                        k=max(lens) + s_new, acc_dtype=acc)
    # the other kernel on the same input: the same result to the rounding of the output dtype
    from exaone_ext import _C
    before = _C._set_attn_decode(attn_decode != "decode")
    try:
        other = ops.flash_attn_with_kvcache(q, kc, vc, seqlens, causal=False)
    finally:
        _C._set_attn_decode(before)
    torch.testing.assert_close(out_nc.float(), other.float(), atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=0)


@pytest.mark.parametrize("lens,hk", [([200], 8), ([161, 3], 8), ([257], 8), ([300], 2), ([700], 8)],
                         ids=["200", "161-3", "257", "300-hk2", "700"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kvcache_decode_thread_ranges(lens, hk, dtype, attn_decode):
    # short caches cut into one key range per thread (batch below the thread count) and balanced
    # ranges: the result meets the error rule either way, and the two agree to the output's rounding
    from exaone_ext import _C
    b, hq, d = len(lens), 32, 80
    k_cache = torch.randn(b, max(lens) + 4, hk, d).to(dtype)
    v_cache = torch.randn(b, max(lens) + 4, hk, d).to(dtype)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    q, k_new, v_new = _qkv(b, 1, 1, hq, hk, d, dtype, "cpu")
    ref64 = reference.flash_attn_with_kvcache(q.double(), k_cache.double(), v_cache.double(), seqlens,
                                              k_new.double(), v_new.double())
    ref_lp = reference.flash_attn_with_kvcache(q, k_cache.clone(), v_cache.clone(), seqlens, k_new, v_new)
    outs = {}
    for ranges in (True, False):
        before = _C._set_attn_decode_thread_ranges(ranges)
        try:
            outs[ranges] = ops.flash_attn_with_kvcache(q, k_cache.clone(), v_cache.clone(), seqlens, k_new, v_new)
        finally:
            _C._set_attn_decode_thread_ranges(before)
        assert_error_within(outs[ranges], ref64, ref_lp, "out", k=max(lens) + 1, acc_dtype=P_DTYPE.get(dtype))
    torch.testing.assert_close(outs[True].float(), outs[False].float(),
                               atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=0)
    assert _C._set_attn_decode_thread_ranges(True) is True


@pytest.mark.skipif(exaone_ext.get_cpu_isa() == "scalar", reason="the decode kernels need AVX2")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_kernel_is_taken(dtype):
    """On AVX2 (and AVX-512) CPUs decode calls take the decode kernel: its sums run in another order
    than the general kernel's, so the float32 / float16 outputs differ in their last bits."""
    from exaone_ext import _C
    assert "float32 / float16: avx2" in exaone_ext.build_info()["cpu_attention_decode"]
    kc, vc = torch.randn(2, 3000, 2, 128).to(dtype), torch.randn(2, 3000, 2, 128).to(dtype)
    q, lens = torch.randn(2, 1, 8, 128).to(dtype), torch.tensor([2999, 2500], dtype=torch.int32)
    before = _C._set_attn_decode(True)
    try:
        on = ops.flash_attn_with_kvcache(q, kc, vc, lens)
        assert _C._set_attn_decode(False) is True
        assert exaone_ext.build_info()["cpu_attention_decode"].startswith("general")
        off = ops.flash_attn_with_kvcache(q, kc, vc, lens)
    finally:
        _C._set_attn_decode(before)
    assert not torch.equal(on, off)
    torch.testing.assert_close(on.float(), off.float(), atol=1e-5 if dtype == torch.float32 else 2e-3, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kvcache_decode_strided_cache(dtype, attn_decode):
    # caches that are views: heads not adjacent (a [b, seq, 2 * hk, d] buffer, every other head)
    b, hq, hk, d = 2, 8, 2, 80
    big_k = torch.randn(b, 700, 2 * hk, d).to(dtype)
    big_v = torch.randn(b, 700, 2 * hk, d).to(dtype)
    kc, vc = big_k[:, :, ::2], big_v[:, :, ::2]
    seqlens = torch.tensor([650, 3], dtype=torch.int32)
    q = torch.randn(b, 1, hq, d).to(dtype)
    k_new, v_new = torch.randn(b, 1, hk, d).to(dtype), torch.randn(b, 1, hk, d).to(dtype)
    kr, vr = kc.clone(), vc.clone()
    others = big_k[:, :, 1::2].clone(), big_v[:, :, 1::2].clone()
    out = ops.flash_attn_with_kvcache(q, kc, vc, seqlens, k_new, v_new)
    ref_lp = reference.flash_attn_with_kvcache(q, kr, vr, seqlens, k_new, v_new)
    # the float64 oracle attends to the new token too (it used to leave it out, and was held only
    # against the bfloat16 reference, which was just as far from it)
    ref64 = reference.flash_attn_with_kvcache(q.double(), kr.double(), vr.double(), seqlens, k_new.double(),
                                              v_new.double())
    assert_error_within(out, ref64, ref_lp, "out", k=651, acc_dtype=P_DTYPE.get(dtype))
    assert torch.equal(kc, kr) and torch.equal(vc, vr)
    # the heads in between were not written
    assert torch.equal(big_k[:, :, 1::2], others[0]) and torch.equal(big_v[:, :, 1::2], others[1])


def test_chunked_prefill_equals_full_recomputation(device):
    b, s, hq, hk, d = 2, 150, 8, 2, 80
    q, k, v = _qkv(b, s, s, hq, hk, d, torch.float32, device)
    full = ops.flash_attn(q, k, v, causal=True)
    k_cache = torch.zeros(b, 200, hk, d, device=device)
    v_cache = torch.zeros(b, 200, hk, d, device=device)
    lens = torch.zeros(b, dtype=torch.int32, device=device)
    outs = []
    for start in range(0, s, 37):
        end = min(s, start + 37)
        outs.append(ops.flash_attn_with_kvcache(q[:, start:end], k_cache, v_cache, lens, k[:, start:end],
                                                v[:, start:end], causal=True))
        lens += end - start
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_cache[:, :s], k)


# ---- operator checks -----------------------------------------------------------------------------------

def test_opcheck_all_ops(device):
    q, k, v = _qkv(2, 9, 11, 4, 2, 64, torch.float32, device)
    for x in (q, k, v):
        x.requires_grad_()
    torch.library.opcheck(_ops.flash_attn_fwd.default, (q, k, v, True, 0.125))
    out, lse = _ops.flash_attn_fwd(q, k, v, False, 0.125)
    dout = torch.randn_like(out)
    torch.library.opcheck(_ops.flash_attn_bwd.default, (dout, q.detach(), k.detach(), v.detach(), out.detach(),
                                                       lse.detach(), False, 0.125))
    qp, kp, vp, cu_q, cu_k = _packed([3, 0, 8], [5, 2, 8], 4, 2, 64, torch.float32, device)
    for x in (qp, kp, vp):
        x.requires_grad_()
    torch.library.opcheck(_ops.flash_attn_varlen_fwd.default, (qp, kp, vp, cu_q, cu_k, 8, 8, True, 0.125))
    out, lse = _ops.flash_attn_varlen_fwd(qp, kp, vp, cu_q, cu_k, 8, 8, True, 0.125)
    torch.library.opcheck(_ops.flash_attn_varlen_bwd.default,
                          (torch.randn_like(out), qp.detach(), kp.detach(), vp.detach(), out.detach(), lse.detach(),
                           cu_q, cu_k, 8, 8, True, 0.125))
    kc, vc = torch.randn(2, 16, 2, 64, device=device), torch.randn(2, 16, 2, 64, device=device)
    lens = torch.tensor([3, 9], dtype=torch.int32, device=device)
    qn, kn, vn = _qkv(2, 2, 2, 4, 2, 64, torch.float32, device)
    torch.library.opcheck(_ops.flash_attn_kvcache.default, (qn, kc, vc, lens, kn, vn, True, 0.125))
    torch.library.opcheck(_ops.flash_attn_kvcache.default, (qn, kc, vc, lens, None, None, False, 0.125))
    torch.library.opcheck(_ops.flash_attn_kvcache.default, (qn, kc, vc, lens, kn, vn, True, 0.125, 9))


def test_gradcheck_float64():
    q, k, v = [x.requires_grad_() for x in _qkv(1, 5, 7, 4, 2, 64, torch.float64)]
    assert torch.autograd.gradcheck(lambda a, b, c: ops.flash_attn(a, b, c, causal=True), (q, k, v), fast_mode=True)
    q, k, v = [x.requires_grad_() for x in _qkv(1, 6, 4, 2, 1, 80, torch.float64)]
    assert torch.autograd.gradcheck(lambda a, b, c: ops.flash_attn(a, b, c, causal=False, softmax_scale=0.3), (q, k, v), fast_mode=True)
    qp, kp, vp, cu_q, cu_k = _packed([3, 0, 4], [2, 3, 5], 4, 2, 64, torch.float64)
    for x in (qp, kp, vp):
        x.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c: ops.flash_attn_varlen(a, b, c, cu_q, cu_k, 4, 5), (qp, kp, vp), fast_mode=True)


def test_torch_compile_fullgraph():
    def block(q, k, v, cu):
        dense = ops.flash_attn(q, k, v, causal=True)
        packed = ops.flash_attn_varlen(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, 16, 16)
        return dense.sum() + packed.sum()

    q, k, v = [x.requires_grad_() for x in _qkv(2, 16, 16, 4, 2, 64, torch.float32)]
    cu = torch.tensor([0, 16, 32], dtype=torch.int32)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v, cu)
    grads = torch.autograd.grad(loss, (q, k, v))
    ref_grads = torch.autograd.grad(block(q, k, v, cu), (q, k, v))
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r)


def test_reference_used_without_kernel(no_kernel):
    """A device without kernels runs the references (dense, varlen, kv-cache): no exaone_ext op
    dispatched, the references' results."""
    q, k, v = _qkv(2, 5, 5, 4, 2, 64, torch.float32)
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    qp, kp, vp = (t.reshape(10, *t.shape[2:]) for t in (q, k, v))
    kc, vc = torch.zeros(2, 8, 2, 64), torch.zeros(2, 8, 2, 64)
    lens = torch.tensor([0, 2], dtype=torch.int32)
    kc[1, :2], vc[1, :2] = k[1, :2], v[1, :2]
    kr, vr, lr = kc.clone(), vc.clone(), lens.clone()
    with no_kernel() as seen:
        dense = ops.flash_attn(q, k, v, causal=True)
        packed = ops.flash_attn_varlen(qp, kp, vp, cu, cu, 7, 7, causal=True)
        cached = ops.flash_attn_with_kvcache(q[:, :1], kc, vc, lens, k[:, :1], v[:, :1], causal=True)
    assert seen == set()
    assert torch.equal(dense, reference.flash_attn(q, k, v, causal=True))
    assert torch.equal(packed, reference.flash_attn_varlen(qp, kp, vp, cu, cu, 7, 7, causal=True))
    assert torch.equal(cached, reference.flash_attn_with_kvcache(q[:, :1], kr, vr, lr, k[:, :1], v[:, :1],
                                                                  causal=True))
    assert torch.equal(kc, kr) and torch.equal(vc, vr) and lens.tolist() == lr.tolist() == [0, 2]


def test_meta_device_traces():
    q = torch.empty(1, 3, 4, 64, device="meta")
    k = torch.empty(1, 3, 2, 64, device="meta")
    assert ops.flash_attn(q, k, k).shape == q.shape


# ---- bad inputs ------------------------------------------------------------------------------------------

def test_bad_inputs():
    q, k, v = _qkv(1, 4, 4, 6, 4, 64, torch.float32)
    with pytest.raises(ValueError, match=r"q heads \(6\) must be a multiple of the kv heads \(4\)"):
        ops.flash_attn(q, k, v)
    q, k, v = _qkv(1, 4, 4, 4, 2, 72, torch.float32)
    with pytest.raises(ValueError, match="head_dim must be one of 64, 80, 96, 128, 256, got 72"):
        ops.flash_attn(q, k, v)
    q, k, v = _qkv(1, 4, 4, 4, 2, 64, torch.float32)
    with pytest.raises(TypeError, match="'k' must have the same dtype as 'q'"):
        ops.flash_attn(q, k.half(), v)
    with pytest.raises(TypeError, match="'q' must be float32, bfloat16 or float16"):
        ops.flash_attn(q.int(), k.int(), v.int())
    with pytest.raises(ValueError, match="'v' must have the same shape as 'k'"):
        ops.flash_attn(q, k, v[:, :3])
    with pytest.raises(ValueError, match="'q' must be 4-dimensional"):
        ops.flash_attn(q[0], k, v)
    with pytest.raises(ValueError, match="'k' must have the batch size of 'q'"):
        ops.flash_attn(q, torch.cat([k, k]), torch.cat([v, v]))
    with pytest.raises(ValueError, match="'softmax_scale' must be finite"):
        ops.flash_attn(q, k, v, softmax_scale=float("nan"))
    with pytest.raises(TypeError, match="'v' must be a torch.Tensor"):
        ops.flash_attn(q, k, [1.0])
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="same device"):
            ops.flash_attn(q, k.cuda(), v)
    # backward op arguments
    out, lse = _ops.flash_attn_fwd(q, k, v, True, 0.125)
    with pytest.raises(ValueError, match="'lse' must have shape"):
        _ops.flash_attn_bwd(out, q, k, v, out, lse[:, :1], True, 0.125)
    with pytest.raises(TypeError, match="'lse' must be float32"):
        _ops.flash_attn_bwd(out, q, k, v, out, lse.double(), True, 0.125)
    with pytest.raises(ValueError, match="'dout' must have the same shape as 'q'"):
        _ops.flash_attn_bwd(out[:, :2], q, k, v, out, lse, True, 0.125)
    with pytest.raises(ValueError, match="'q' must have a contiguous last dimension"):
        _ops.flash_attn_fwd(q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v, True, 0.125)


def test_bad_varlen_inputs():
    q, k, v, cu_q, cu_k = _packed([3, 4], [3, 4], 4, 2, 64, torch.float32)
    with pytest.raises(TypeError, match="'cu_seqlens_q' must be int32"):
        ops.flash_attn_varlen(q, k, v, cu_q.long(), cu_k, 4, 4)
    with pytest.raises(ValueError, match="'cu_seqlens_k' must be non-decreasing"):
        ops.flash_attn_varlen(q, k, v, cu_q, torch.tensor([0, 5, 3], dtype=torch.int32), 4, 5)
    with pytest.raises(ValueError, match=r"'cu_seqlens_q'\[2\] = 9 is out of range"):
        ops.flash_attn_varlen(q, k, v, torch.tensor([0, 3, 9], dtype=torch.int32), cu_k, 6, 4)
    with pytest.raises(ValueError, match=r"'cu_seqlens_q'\[0\] = -1 is out of range"):
        ops.flash_attn_varlen(q, k, v, torch.tensor([-1, 3, 7], dtype=torch.int32), cu_k, 4, 4)
    with pytest.raises(ValueError, match="more than max_seqlen_q = 3"):
        ops.flash_attn_varlen(q, k, v, cu_q, cu_k, 3, 4)
    with pytest.raises(ValueError, match="must have the same length"):
        ops.flash_attn_varlen(q, k, v, cu_q, cu_k[:2], 4, 4)
    with pytest.raises(ValueError, match="'q' must be 3-dimensional"):
        ops.flash_attn_varlen(q[None], k, v, cu_q, cu_k, 4, 4)


def test_bad_kvcache_inputs():
    b, hq, hk, d = 2, 4, 2, 64
    kc, vc = torch.randn(b, 10, hk, d), torch.randn(b, 10, hk, d)
    q = torch.randn(b, 1, hq, d)
    kn, vn = torch.randn(b, 1, hk, d), torch.randn(b, 1, hk, d)
    lens = torch.tensor([3, 9], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"'cache_seqlens'\[1\] = 10 plus the new tokens \(1\) exceeds max_seq = 10"):
        ops.flash_attn_with_kvcache(q, kc, vc, torch.tensor([3, 10], dtype=torch.int32), kn, vn)
    with pytest.raises(ValueError, match=r"'cache_seqlens'\[1\] = 11 exceeds max_seq = 10"):
        ops.flash_attn_with_kvcache(q, kc, vc, torch.tensor([3, 11], dtype=torch.int32))
    with pytest.raises(ValueError, match="is negative"):
        ops.flash_attn_with_kvcache(q, kc, vc, torch.tensor([-1, 2], dtype=torch.int32))
    with pytest.raises(TypeError, match="'cache_seqlens' must be int32"):
        ops.flash_attn_with_kvcache(q, kc, vc, lens.long())
    with pytest.raises(ValueError, match=r"'cache_seqlens' must have shape \[batch\]"):
        ops.flash_attn_with_kvcache(q, kc, vc, lens[:1])
    with pytest.raises(ValueError, match="'k_new' must have shape"):
        ops.flash_attn_with_kvcache(q, kc, vc, lens, torch.randn(b, 1, hq, d), torch.randn(b, 1, hq, d))
    with pytest.raises(ValueError, match="'v_new' must have the same shape as 'k_new'"):
        ops.flash_attn_with_kvcache(q, kc, vc, lens, kn, torch.randn(b, 2, hk, d))
    with pytest.raises(ValueError, match="'k_new' and 'v_new' must be given together"):
        ops.flash_attn_with_kvcache(q, kc, vc, lens, kn, None)
    with pytest.raises(ValueError, match="'k_cache' must have a contiguous last dimension"):
        ops.flash_attn_with_kvcache(q, kc.transpose(-1, -2).contiguous().transpose(-1, -2), vc, lens)
    # the caller's bound: checked against max_seq, and (on the CPU) against the lengths themselves
    with pytest.raises(ValueError, match=r"'cache_seqlens'\[1\] = 9 is above 'cache_seqlens_max' = 5"):
        ops.flash_attn_with_kvcache(q, kc, vc, lens, kn, vn, cache_seqlens_max=5)
    with pytest.raises(ValueError, match=r"'cache_seqlens_max' = 10 plus the new tokens \(1\) exceeds max_seq = 10"):
        ops.flash_attn_with_kvcache(q, kc, vc, lens, kn, vn, cache_seqlens_max=10)
    with pytest.raises(ValueError, match=r"'cache_seqlens_max' must be >= 0, got -1"):
        ops.flash_attn_with_kvcache(q, kc, vc, lens, cache_seqlens_max=-1)
    with pytest.raises(TypeError, match="'cache_seqlens_max' must be an int or None, got float"):
        ops.flash_attn_with_kvcache(q, kc, vc, lens, cache_seqlens_max=9.0)
    with pytest.raises(ValueError, match="exceed cache_seqlens_max"):
        reference.flash_attn_with_kvcache(q, kc, vc, lens, cache_seqlens_max=5)
    assert lens.tolist() == [3, 9]


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="CUDA: no device")
def test_kvcache_unchecked_lengths_stay_inside_the_caches_cuda():
    """On CUDA a bound below the true lengths is not detected (that would take a device read), but
    the writes and the kernels clamp every position to the cache: no fault, the other rows exact."""
    b, max_seq, hq, hk, d = 2, 16, 4, 2, 64
    kc = torch.randn(b, max_seq, hk, d, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    lens = torch.tensor([3, 40], dtype=torch.int32, device="cuda")  # row 1 is past max_seq
    q, kn, vn = _qkv(b, 1, 1, hq, hk, d, torch.bfloat16, "cuda")
    out = ops.flash_attn_with_kvcache(q, kc, vc, lens, kn, vn, cache_seqlens_max=3)
    torch.cuda.synchronize()  # a fault in the kernels would surface here
    kr, vr = kc.clone(), vc.clone()
    ref = reference.flash_attn_with_kvcache(q[:1], kr[:1], vr[:1], lens[:1], kn[:1], vn[:1])
    torch.testing.assert_close(out[:1].float(), ref.float(), atol=2e-2, rtol=0)


def _cpuinfo_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them, read here independently of the package."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@pytest.mark.skipif(not _cpuinfo_flags(), reason="no /proc/cpuinfo flags to compare with")
def test_bf16_engines_follow_the_cpu():
    """Where Linux reports AMX tiles with bf16 (and oneDNN's brgemm works), bfloat16 attention's tile
    products and the decode-time linear from 6 rows run on brgemm's AMX code by default; elsewhere
    attention keeps the kernels' own products and the linear starts brgemm at 16 rows."""
    info = exaone_ext.build_info()
    amx_flags = {"amx_tile", "amx_bf16"} <= _cpuinfo_flags()
    amx = amx_flags and ATTN_BRGEMM and info["cpu_isa"] == "avx512"
    assert info["cpu_attention_bf16_products"].startswith("oneDNN brgemm (AMX)") == amx, info
    assert tuple(info["cpu_linear_brgemm_rows"]) == (6 if amx_flags else 16, 64), info
    if amx:
        assert info["cpu_linear_bf16_rows"] == "oneDNN brgemm (AMX)", info
