"""The CUDA attention kernels against the float64 reference: forward, LSE and gradients for dense,
packed (varlen) and KV-cache layouts, on the tensor-core path (bfloat16 / float16, head dims 64, 80,
96, 128) and the CUDA-core path (float32, head dim 256). Skipped without a CUDA device and build."""
from __future__ import annotations

import math

import pytest
import torch

from exaone_ext import ops
from exaone_ext.ops import reference
from conftest import CUDA, assert_error_within

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="CUDA: no device or no CUDA build")]

DEV = "cuda"
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (seq_q, seq_k): equal lengths of the issue, seq_q < seq_k (bottom-right causal), and seq_q > seq_k
# (causal rows that see no key).
SEQS = [(1, 1), (17, 17), (97, 97), (128, 128), (1025, 1025), (1, 1025), (17, 97), (128, 1025), (97, 17)]
GQA = [(4, 4), (8, 2), (8, 1)]  # (q_heads, kv_heads): ratios 1, 4, 8


def _within(out, ref64, ref_lp, name, k):
    """conftest's error rule with sums of k terms (keys, or queries per kv head) formed in the input
    dtype: the tensor-core kernels round P (and dS in the backward) to it for their products."""
    assert_error_within(out, ref64, ref_lp, name, k=k, acc_dtype=None if out.dtype == torch.float32 else out.dtype)


def _rand(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, device=DEV) * scale).to(dtype)


def _check_lse(lse, lse64, lse_lp, name="lse", k=1):
    """LSE rows that see no key are -inf in all three; the others follow the error rule."""
    finite = torch.isfinite(lse64)
    assert torch.equal(torch.isfinite(lse), finite), f"{name}: -inf rows differ from the reference"
    _within(lse.masked_fill(~finite, 0), lse64.masked_fill(~finite, 0).double(),
                        lse_lp.masked_fill(~finite, 0), name, k)


def _grads(fn, inputs, dout):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    out.backward(dout.to(out.dtype))
    return out.detach(), [x.grad for x in leaves]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", GQA)
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("seqs", SEQS)
def test_dense_forward_backward(seqs, head_dim, heads, causal, dtype):
    (sq, sk), (hq, hk), b = seqs, heads, 2
    q, k, v = _rand(b, sq, hq, head_dim, dtype=dtype), _rand(b, sk, hk, head_dim, dtype=dtype), \
        _rand(b, sk, hk, head_dim, dtype=dtype)
    dout = _rand(b, sq, hq, head_dim, dtype=dtype)
    out, lse = ops.flash_attn(q, k, v, causal=causal, return_lse=True)
    out64, lse64 = reference.flash_attn(q.double(), k.double(), v.double(), causal, None, True)
    out_lp, lse_lp = reference.flash_attn(q, k, v, causal, None, True)
    _within(out, out64, out_lp, "out", sk)
    _check_lse(lse, lse64, lse_lp, k=sk)

    _, g = _grads(lambda q, k, v: ops.flash_attn(q, k, v, causal=causal), (q, k, v), dout)
    _, g64 = _grads(lambda q, k, v: reference.flash_attn(q, k, v, causal), (q.double(), k.double(), v.double()), dout)
    _, g_lp = _grads(lambda q, k, v: reference.flash_attn(q, k, v, causal), (q, k, v), dout)
    for name, a, a64, alp in zip(("dq", "dk", "dv"), g, g64, g_lp):
        _within(a, a64, alp, name, max(sk, sq * hq // hk))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [96, 256])
@pytest.mark.parametrize("seqs", [(17, 97), (128, 128), (97, 17)])
def test_dense_other_head_dims(seqs, head_dim, dtype):
    (sq, sk), hq, hk, b = seqs, 8, 2, 1
    q, k, v = _rand(b, sq, hq, head_dim, dtype=dtype), _rand(b, sk, hk, head_dim, dtype=dtype), \
        _rand(b, sk, hk, head_dim, dtype=dtype)
    dout = _rand(b, sq, hq, head_dim, dtype=dtype)
    out, g = _grads(lambda q, k, v: ops.flash_attn(q, k, v), (q, k, v), dout)
    out64, g64 = _grads(lambda q, k, v: reference.flash_attn(q, k, v), (q.double(), k.double(), v.double()), dout)
    out_lp, g_lp = _grads(lambda q, k, v: reference.flash_attn(q, k, v), (q, k, v), dout)
    _within(out, out64, out_lp, "out", sk)
    for name, a, a64, alp in zip(("dq", "dk", "dv"), g, g64, g_lp):
        _within(a, a64, alp, name, max(sk, sq * hq // hk))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_large_logits_and_scale(dtype):
    """Scores far from zero (large inputs, a non-default and a negative scale) stay finite and exact."""
    q, k, v = _rand(1, 97, 8, 128, dtype=dtype, scale=8), _rand(1, 300, 2, 128, dtype=dtype, scale=8), \
        _rand(1, 300, 2, 128, dtype=dtype)
    for scale in (0.3, -0.05):
        out, lse = ops.flash_attn(q, k, v, causal=True, softmax_scale=scale, return_lse=True)
        out64, lse64 = reference.flash_attn(q.double(), k.double(), v.double(), True, scale, True)
        out_lp, lse_lp = reference.flash_attn(q, k, v, True, scale, True)
        assert torch.isfinite(out).all()
        _within(out, out64, out_lp, "out", 300)
        _check_lse(lse, lse64, lse_lp, k=300)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_non_contiguous_and_misaligned(dtype):
    """Views with unusual strides (a packed qkv projection) and a storage offset that breaks 16-byte
    alignment take the synchronous-load path and give the same result."""
    b, s, hq, hk, d = 2, 97, 8, 2, 80
    qkv = _rand(b, s, hq + 2 * hk, d, dtype=dtype)
    q, k, v = qkv[:, :, :hq], qkv[:, :, hq:hq + hk], qkv[:, :, hq + hk:]
    flat = torch.empty(q.numel() + 1, device=DEV, dtype=dtype)[1:]
    q_odd = flat.view(q.shape).copy_(q)  # data pointer 2 bytes past an aligned address
    dout = _rand(b, s, hq, d, dtype=dtype)
    ref_out, ref_g = _grads(lambda q, k, v: ops.flash_attn(q, k, v), (q.contiguous(), k.contiguous(), v.contiguous()),
                            dout)
    for qq in (q, q_odd):
        out = ops.flash_attn(qq, k, v)
        torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
        _, g = _grads(lambda q, k, v: ops.flash_attn(q, k, v), (qq, k, v), dout)
        torch.testing.assert_close(g[0], ref_g[0], rtol=2e-2, atol=2e-2)  # dq: float32 atomics in any order
        torch.testing.assert_close(g[1], ref_g[1], rtol=0, atol=0)
        torch.testing.assert_close(g[2], ref_g[2], rtol=0, atol=0)


def _cu(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=DEV)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_varlen_forward_backward(head_dim, causal, dtype):
    gen = torch.Generator().manual_seed(1)
    lens_q = [1, 300, 17, 128, 97] + torch.randint(1, 301, (5,), generator=gen).tolist()
    lens_k = [n + int(torch.randint(0, 50, (1,), generator=gen)) for n in lens_q]
    lens_k[3] = 5  # a sequence with fewer keys than queries
    hq, hk = 8, 2
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    q = _rand(sum(lens_q), hq, head_dim, dtype=dtype)
    k, v = _rand(sum(lens_k), hk, head_dim, dtype=dtype), _rand(sum(lens_k), hk, head_dim, dtype=dtype)
    dout = _rand(sum(lens_q), hq, head_dim, dtype=dtype)
    args = (cu_q, cu_k, max(lens_q), max(lens_k), causal)

    out, lse = ops.flash_attn_varlen(q, k, v, *args, return_lse=True)
    out64, lse64 = reference.flash_attn_varlen(q.double(), k.double(), v.double(), *args, return_lse=True)
    out_lp, lse_lp = reference.flash_attn_varlen(q, k, v, *args, return_lse=True)
    _within(out, out64, out_lp, "out", max(lens_k))
    _check_lse(lse, lse64, lse_lp, k=max(lens_k))

    _, g = _grads(lambda q, k, v: ops.flash_attn_varlen(q, k, v, *args), (q, k, v), dout)
    _, g64 = _grads(lambda q, k, v: reference.flash_attn_varlen(q, k, v, *args), (q.double(), k.double(), v.double()),
                    dout)
    _, g_lp = _grads(lambda q, k, v: reference.flash_attn_varlen(q, k, v, *args), (q, k, v), dout)
    for name, a, a64, alp in zip(("dq", "dk", "dv"), g, g64, g_lp):
        _within(a, a64, alp, name, max(max(lens_k), max(lens_q) * hq // hk))


def test_varlen_rows_outside_sequences():
    """Rows not covered by cu_seqlens get out 0, lse -inf and zero gradients; empty sequences are fine."""
    hq, hk, d = 4, 4, 64
    cu_q = torch.tensor([3, 3, 40, 41], dtype=torch.int32, device=DEV)  # rows 0-2 and 41-49 belong to none
    cu_k = torch.tensor([0, 10, 10, 60], dtype=torch.int32, device=DEV)  # sequence 1 has no keys
    q, k, v = _rand(50, hq, d, dtype=torch.bfloat16), _rand(60, hk, d, dtype=torch.bfloat16), \
        _rand(60, hk, d, dtype=torch.bfloat16)
    args = (cu_q, cu_k, 37, 50, True)
    out, lse = ops.flash_attn_varlen(q, k, v, *args, return_lse=True)
    out64, lse64 = reference.flash_attn_varlen(q.double(), k.double(), v.double(), *args, return_lse=True)
    out_lp, lse_lp = reference.flash_attn_varlen(q, k, v, *args, return_lse=True)
    _within(out, out64, out_lp, "out", 50)
    _check_lse(lse, lse64, lse_lp, k=50)
    assert (out[:3] == 0).all() and (out[41:] == 0).all()
    _, g = _grads(lambda q, k, v: ops.flash_attn_varlen(q, k, v, *args), (q, k, v), _rand(50, hq, d, dtype=torch.bfloat16))
    assert (g[0][:3] == 0).all() and (g[0][41:] == 0).all()
    assert all(torch.isfinite(x).all() for x in g)


def _kvcache_case(dtype, b, hq, hk, d, max_seq, lens, s_new, with_new, causal=True):
    q = _rand(b, s_new, hq, d, dtype=dtype)
    k_cache, v_cache = _rand(b, max_seq, hk, d, dtype=dtype), _rand(b, max_seq, hk, d, dtype=dtype)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    k_new = _rand(b, s_new, hk, d, dtype=dtype) if with_new else None
    v_new = _rand(b, s_new, hk, d, dtype=dtype) if with_new else None
    kc, vc = k_cache.clone(), v_cache.clone()
    out = ops.flash_attn_with_kvcache(q, kc, vc, seqlens, k_new, v_new, causal=causal)
    kc64, vc64 = k_cache.double(), v_cache.double()
    out64 = reference.flash_attn_with_kvcache(q.double(), kc64, vc64, seqlens, None if k_new is None else k_new.double(),
                                              None if v_new is None else v_new.double(), causal=causal)
    kcl, vcl = k_cache.clone(), v_cache.clone()
    out_lp = reference.flash_attn_with_kvcache(q, kcl, vcl, seqlens, k_new, v_new, causal=causal)
    _within(out, out64, out_lp, "out", max(lens) + s_new)
    assert torch.equal(kc, kcl) and torch.equal(vc, vcl), "the caches after appending k_new / v_new differ"
    assert torch.equal(seqlens.cpu(), torch.tensor(lens, dtype=torch.int32)), "cache_seqlens was modified"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("s_new", [1, 7])
@pytest.mark.parametrize("with_new", [True, False])
def test_kvcache_ragged(s_new, with_new, head_dim, dtype):
    lens = [0 if with_new else 1, 5, 1000, 4090]  # one empty cache (only the new tokens)
    _kvcache_case(dtype, 4, 32, 8, head_dim, 4100, lens, s_new, with_new)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kvcache_long_single_sequence(dtype):
    """One 32K-token sequence: the split-KV path with many splits and the combine."""
    _kvcache_case(dtype, 1, 32, 8, 128, 32768, [32760], 1, True)
    _kvcache_case(dtype, 1, 40, 8, 80, 32768, [20001], 1, False)


@pytest.fixture(params=[1, 0], ids=["128-row", "64-row"])
def wide_rows(request):
    """Both block shapes of the tensor-core forward for more than 16 packed rows (the automatic rule
    takes 128 rows only for grids that fill the GPU, which few test shapes do)."""
    from exaone_ext import _C
    previous = _C._set_cuda_attn_wide_rows(request.param)
    yield request.param
    _C._set_cuda_attn_wide_rows(previous)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128])
@pytest.mark.parametrize("seqs", [(17, 17), (97, 97), (1025, 1025), (128, 1025), (97, 17), (5, 300)])
def test_forward_block_shapes(seqs, head_dim, causal, dtype, wide_rows):
    """The forward (out and LSE) on the 128- and 64-row blocks: partial last blocks, bottom-right
    causal, rows that see no key, groups of 1, 4 and 8, and a split-KV grid (5 x 300, one kv head)."""
    torch.manual_seed(0)
    sq, sk = seqs
    for hq, hk in [(4, 4), (8, 2), (8, 1)]:
        q, k, v = _rand(2, sq, hq, head_dim, dtype=dtype), _rand(2, sk, hk, head_dim, dtype=dtype), \
            _rand(2, sk, hk, head_dim, dtype=dtype)
        out, lse = ops.flash_attn(q, k, v, causal=causal, return_lse=True)
        out64, lse64 = reference.flash_attn(q.double(), k.double(), v.double(), causal, return_lse=True)
        out_lp, lse_lp = reference.flash_attn(q, k, v, causal, return_lse=True)
        _within(out, out64, out_lp, f"out {hq}/{hk}", sk)
        _check_lse(lse, lse64, lse_lp, k=sk)


@pytest.fixture(params=[True, False], ids=["key-split", "64-row"])
def key_split(request):
    """Both block shapes of the tensor-core forward for decode rows (seq_q * group <= 16)."""
    from exaone_ext import _C
    previous = _C._set_cuda_attn_key_split(request.param)
    yield request.param
    _C._set_cuda_attn_key_split(previous)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128])
def test_decode_block_shapes(head_dim, dtype, key_split):
    """Decode on both forward block shapes: groups of 1, 4, 5, 8 and 16 with 1-4 new tokens (4 to 16
    packed rows), ragged caches with an empty one and one long enough for split-KV; dense single rows
    causal and not with their LSE; NaN keys and values in a split."""
    torch.manual_seed(0)
    for hq, hk, s_new in [(32, 8, 1), (40, 8, 3), (8, 1, 2), (4, 4, 4), (16, 1, 1)]:
        _kvcache_case(dtype, 3, hq, hk, head_dim, 3000, [0, 17, 2999 - s_new], s_new, True)
    _kvcache_case(dtype, 2, 32, 8, head_dim, 300, [0, 40], 1, False)  # a cache with no key at all
    for causal in (True, False):
        q, k, v = _rand(2, 1, 32, head_dim, dtype=dtype), _rand(2, 700, 8, head_dim, dtype=dtype), \
            _rand(2, 700, 8, head_dim, dtype=dtype)
        out, lse = ops.flash_attn(q, k, v, causal=causal, return_lse=True)
        out64, lse64 = reference.flash_attn(q.double(), k.double(), v.double(), causal, return_lse=True)
        out_lp, lse_lp = reference.flash_attn(q, k, v, causal, return_lse=True)
        _within(out, out64, out_lp, "out", 700)
        _check_lse(lse, lse64, lse_lp, k=700)
    # a NaN key makes its rows NaN; a NaN value only its column (split-KV over 2900 keys)
    kc, vc = _rand(1, 3000, 2, head_dim, dtype=dtype), _rand(1, 3000, 2, head_dim, dtype=dtype)
    lens = torch.tensor([2900], dtype=torch.int32, device=DEV)
    q = _rand(1, 1, 8, head_dim, dtype=dtype)
    kc[0, 2100, 0, 3] = float("nan")
    vc[0, 2500, 1, 1] = float("nan")
    out = ops.flash_attn_with_kvcache(q, kc, vc, lens)
    assert out[0, 0, :4].isnan().all(), "a NaN key of kv head 0 did not reach its query heads"
    assert out[0, 0, 4:, 1].isnan().all() and out[0, 0, 4:, 0].isfinite().all() and out[0, 0, 4:, 2:].isfinite().all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_prefill_equals_full(dtype):
    """Filling a cache chunk by chunk and attending each chunk to the cache equals one full causal pass."""
    b, s, hq, hk, d, chunk = 2, 300, 32, 8, 128, 64
    q, k, v = _rand(b, s, hq, d, dtype=dtype), _rand(b, s, hk, d, dtype=dtype), _rand(b, s, hk, d, dtype=dtype)
    k_cache = torch.zeros(b, 512, hk, d, device=DEV, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    seqlens = torch.zeros(b, dtype=torch.int32, device=DEV)
    outs = []
    for c0 in range(0, s, chunk):
        c1 = min(s, c0 + chunk)
        outs.append(ops.flash_attn_with_kvcache(q[:, c0:c1], k_cache, v_cache, seqlens, k[:, c0:c1], v[:, c0:c1]))
        seqlens += c1 - c0
    out = torch.cat(outs, 1)
    out64 = reference.flash_attn(q.double(), k.double(), v.double(), True)
    out_lp = reference.flash_attn(q, k, v, True)
    _within(out, out64, out_lp, "chunked prefill", 300)
    full = ops.flash_attn(q, k, v, causal=True)
    _within(full, out64, out_lp, "full pass", 300)


def test_opcheck_every_op():
    dtype, d = torch.bfloat16, 64
    q, k, v = _rand(1, 17, 4, d, dtype=dtype), _rand(1, 33, 2, d, dtype=dtype), _rand(1, 33, 2, d, dtype=dtype)
    out, lse = torch.ops.exaone_ext.flash_attn_fwd(q, k, v, True, 0.125)
    dout = _rand(1, 17, 4, d, dtype=dtype)
    torch.library.opcheck(torch.ops.exaone_ext.flash_attn_fwd, (q, k, v, True, 0.125))
    torch.library.opcheck(torch.ops.exaone_ext.flash_attn_bwd, (dout, q, k, v, out, lse, True, 0.125))
    cu_q, cu_k = _cu([5, 12]), _cu([20, 13])
    qv, kv, vv = q[0], k[0], v[0]
    outv, lsev = torch.ops.exaone_ext.flash_attn_varlen_fwd(qv, kv, vv, cu_q, cu_k, 12, 20, True, 0.125)
    torch.library.opcheck(torch.ops.exaone_ext.flash_attn_varlen_fwd, (qv, kv, vv, cu_q, cu_k, 12, 20, True, 0.125))
    torch.library.opcheck(torch.ops.exaone_ext.flash_attn_varlen_bwd,
                          (dout[0], qv, kv, vv, outv, lsev, cu_q, cu_k, 12, 20, True, 0.125))
    kc, vc = _rand(1, 64, 2, d, dtype=dtype), _rand(1, 64, 2, d, dtype=dtype)
    seqlens = torch.tensor([30], dtype=torch.int32, device=DEV)
    torch.library.opcheck(torch.ops.exaone_ext.flash_attn_kvcache, (q[:, :1], kc, vc, seqlens, None, None, True, 0.125),
                          test_utils=("test_schema", "test_faketensor"))


def test_bad_inputs_on_cuda():
    q = _rand(1, 8, 4, 64, dtype=torch.bfloat16)
    k = _rand(1, 8, 3, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="multiple of the kv heads"):
        ops.flash_attn(q, k, k)
    with pytest.raises((ValueError, RuntimeError), match="device"):
        ops.flash_attn(q, q.cpu(), q.cpu())
    with pytest.raises(TypeError, match="q"):
        ops.flash_attn(q.double(), q.double(), q.double())
    kc = _rand(1, 16, 4, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="cache_seqlens"):
        ops.flash_attn_with_kvcache(q[:, :1], kc, kc.clone(), torch.tensor([17], dtype=torch.int32, device=DEV))


def test_empty_inputs():
    q = _rand(0, 5, 4, 64, dtype=torch.bfloat16)
    assert ops.flash_attn(q, q, q).shape == q.shape
    q = _rand(2, 0, 4, 64, dtype=torch.bfloat16)
    out, lse = ops.flash_attn(q, q, q, return_lse=True)
    assert out.shape == q.shape and lse.shape == (2, 4, 0)
    torch.cuda.synchronize()
