import math

import pytest
import torch

import exaone_ext
from exaone_ext import ops
from exaone_ext.ops import reference
from conftest import CUDA, DEVICES, DTYPES, assert_error_within

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
MAX_POS = 32768


def _tables(head_dim, device="cpu"):
    return ops.rope_cos_sin(head_dim, MAX_POS, 1e6, LLAMA3, device=device)


def _positions(batch, seq, device, kind="random"):
    if kind == "offset":  # decode / continued prefill: a contiguous run starting anywhere
        start = torch.randint(0, MAX_POS - seq, (batch, 1))
        pos = start + torch.arange(seq)
    else:  # arbitrary positions, always including the extremes of the table
        pos = torch.randint(0, MAX_POS, (batch, seq))
        pos.view(-1)[0] = MAX_POS - 1
        if pos.numel() > 1:
            pos.view(-1)[1] = 8193
    return pos.to(device)


def _ref64(q, k, cos, sin, pos, interleaved):
    return reference.apply_rope(q.double(), k.double(), cos, sin, pos, interleaved)


# --- tables ---------------------------------------------------------------------------------

@pytest.mark.parametrize("scaling", [None, LLAMA3, {"rope_type": "default"}])
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_tables_match_reference(head_dim, scaling, device):
    cos, sin = ops.rope_cos_sin(head_dim, MAX_POS, 1e6, scaling, device=device)
    assert cos.shape == sin.shape == (MAX_POS, head_dim // 2)
    assert cos.dtype == sin.dtype == torch.float32 and cos.device.type == device
    rc, rs = reference.rope_cos_sin(head_dim, MAX_POS, 1e6, scaling)
    # float64 math rounded once: equal to the reference up to a float32 rounding flip
    torch.testing.assert_close(cos.cpu(), rc, atol=1.2e-7, rtol=0)
    torch.testing.assert_close(sin.cpu(), rs, atol=1.2e-7, rtol=0)
    angles = torch.outer(torch.arange(MAX_POS, dtype=torch.float64), reference.rope_inv_freq(head_dim, 1e6, scaling))
    assert (cos.cpu().double() - angles.cos()).abs().max() <= 6e-8
    assert (sin.cpu().double() - angles.sin()).abs().max() <= 6e-8


def test_llama3_rule_changes_low_frequencies():
    plain = reference.rope_inv_freq(128, 1e6)
    scaled = reference.rope_inv_freq(128, 1e6, LLAMA3)
    cos, _ = ops.rope_cos_sin(128, 9000, 1e6, LLAMA3)
    cos_plain, _ = ops.rope_cos_sin(128, 9000, 1e6)
    assert scaled[0] == plain[0] and scaled[-1] == pytest.approx(plain[-1] / 8)
    assert not torch.equal(cos[8192:, -1], cos_plain[8192:, -1])
    assert torch.equal(cos[:, 0], cos_plain[:, 0])


def test_tables_other_theta_and_small():
    cos, sin = ops.rope_cos_sin(16, 5, theta=10000.0)
    rc, rs = reference.rope_cos_sin(16, 5, theta=10000.0)
    torch.testing.assert_close(cos, rc, atol=1.2e-7, rtol=0)
    torch.testing.assert_close(sin, rs, atol=1.2e-7, rtol=0)
    c0, s0 = ops.rope_cos_sin(8, 0)
    assert c0.shape == s0.shape == (0, 4)


def test_table_bad_arguments():
    with pytest.raises(ValueError, match="'head_dim' must be a positive even number"):
        ops.rope_cos_sin(79, 10)
    with pytest.raises(TypeError, match="'max_position' must be an int"):
        ops.rope_cos_sin(80, 10.0)
    with pytest.raises(ValueError, match="'max_position' must be >= 0"):
        ops.rope_cos_sin(80, -1)
    with pytest.raises(ValueError, match="'theta' must be positive"):
        ops.rope_cos_sin(80, 10, theta=0.0)
    with pytest.raises(ValueError, match="rope_type must be 'llama3' or 'default', got 'yarn'"):
        ops.rope_cos_sin(80, 10, scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="missing 'low_freq_factor'"):
        ops.rope_cos_sin(80, 10, scaling={k: v for k, v in LLAMA3.items() if k != "low_freq_factor"})
    with pytest.raises(ValueError, match="'factor' must be positive"):
        ops.rope_cos_sin(80, 10, scaling={**LLAMA3, "factor": 0.0})
    with pytest.raises(ValueError, match="'factor' must be positive"):
        ops.rope_cos_sin(80, 10, scaling={**LLAMA3, "factor": -2.0})
    with pytest.raises(ValueError, match="low_freq_factor' < 'high_freq_factor'"):
        ops.rope_cos_sin(80, 10, scaling={**LLAMA3, "high_freq_factor": 1.0})
    with pytest.raises(TypeError, match="'scaling' must be a dict"):
        ops.rope_cos_sin(80, 10, scaling="llama3")
    # the op itself checks too (for callers of torch.ops directly)
    pos = torch.arange(4)
    with pytest.raises(ValueError, match="'head_dim' must be a positive even number"):
        torch.ops.exaone_ext.rope_cos_sin(pos, 7, 1e6, False, 1.0, 1.0, 1.0, 1.0)
    with pytest.raises(TypeError, match="'positions' must be int64"):
        torch.ops.exaone_ext.rope_cos_sin(pos.float(), 8, 1e6, False, 1.0, 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="'factor' must be positive"):
        torch.ops.exaone_ext.rope_cos_sin(pos, 8, 1e6, True, 0.0, 1.0, 4.0, 8192.0)


# --- apply_rope ------------------------------------------------------------------------------

# (batch, seq, q_heads, kv_heads, head_dim): odd token counts, EXAONE head dims, GQA 4 and 32
CASES = [(1, 1, 32, 8, 64), (1, 3, 32, 8, 80), (2, 17, 32, 8, 128), (1, 17, 32, 1, 256), (1, 1000, 32, 8, 80),
         (3, 3, 32, 1, 64)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_forward_backward_matches_reference(case, dtype, interleaved, device, cpu_isa):
    batch, seq, q_heads, kv_heads, head_dim = case
    cos, sin = _tables(head_dim, device)
    pos = _positions(batch, seq, device)
    q = torch.randn(batch, seq, q_heads, head_dim, device=device).mul_(4).to(dtype).requires_grad_()
    k = torch.randn(batch, seq, kv_heads, head_dim, device=device).to(dtype).requires_grad_()
    dq_out = torch.randn_like(q)
    dk_out = torch.randn_like(k)

    q_out, k_out = ops.apply_rope(q, k, cos, sin, pos, interleaved=interleaved)
    torch.autograd.backward((q_out, k_out), (dq_out, dk_out))

    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    rq64, rk64 = _ref64(q64, k64, cos, sin, pos, interleaved)
    torch.autograd.backward((rq64, rk64), (dq_out.double(), dk_out.double()))
    ql, kl = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    rql, rkl = reference.apply_rope(ql, kl, cos, sin, pos, interleaved)
    torch.autograd.backward((rql, rkl), (dq_out, dk_out))

    assert_error_within(q_out, rq64, rql, "q_out", k=2)
    assert_error_within(k_out, rk64, rkl, "k_out", k=2)
    assert_error_within(q.grad, q64.grad, ql.grad, "dq", k=2)
    assert_error_within(k.grad, k64.grad, kl.grad, "dk", k=2)


@pytest.mark.parametrize("head_dim", [2, 6, 34, 96, 100])
@pytest.mark.parametrize("interleaved", [False, True])
def test_any_even_head_dim(head_dim, interleaved, cpu_isa):
    cos, sin = ops.rope_cos_sin(head_dim, 64, 1e4)
    q = torch.randn(2, 5, 3, head_dim)
    k = torch.randn(2, 5, 2, head_dim)
    pos = torch.randint(0, 64, (2, 5))
    out = ops.apply_rope(q, k, cos, sin, pos, interleaved)
    ref = reference.apply_rope(q, k, cos, sin, pos, interleaved)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_non_contiguous_fused_qkv(dtype, interleaved, device, cpu_isa):
    # q and k as views into one fused qkv projection output [batch, seq, (hq + 2 hk) * d]
    batch, seq, hq, hk, d = 2, 9, 32, 8, 80
    qkv = torch.randn(batch, seq, (hq + 2 * hk) * d, device=device).to(dtype)
    q = qkv[..., : hq * d].view(batch, seq, hq, d)
    k = qkv[..., hq * d: (hq + hk) * d].view(batch, seq, hk, d)
    assert not q.is_contiguous() and not k.is_contiguous()
    cos, sin = _tables(d, device)
    pos = _positions(batch, seq, device, "offset")
    before = qkv.clone()
    q_out, k_out = ops.apply_rope(q, k, cos, sin, pos, interleaved)
    rq, rk = reference.apply_rope(q, k, cos, sin, pos, interleaved)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(q_out, rq, **tol)
    torch.testing.assert_close(k_out, rk, **tol)
    assert torch.equal(qkv, before), "inputs must not be modified"
    # head-major layout (transposed seq/heads) and a non-contiguous last dim
    qt = torch.randn(batch, hq, seq, d, device=device).to(dtype).transpose(1, 2)
    kt = torch.randn(batch, seq, hk, 2 * d, device=device).to(dtype)[..., ::2]
    out = ops.apply_rope(qt, kt, cos, sin, pos, interleaved)
    ref = reference.apply_rope(qt, kt, cos, sin, pos, interleaved)
    torch.testing.assert_close(out[0], ref[0], **tol)
    torch.testing.assert_close(out[1], ref[1], **tol)
    # a broadcast position row [1, seq] and non-contiguous position_ids / tables
    pos_t = torch.randint(0, MAX_POS, (seq, 3), device=device).t()[:1]
    cos_nc = torch.randn(MAX_POS, d, device=device)[:, ::2]
    out = ops.apply_rope(q, k, cos_nc, sin, pos_t, interleaved)
    ref = reference.apply_rope(q, k, cos_nc, sin, pos_t, interleaved)
    torch.testing.assert_close(out[0], ref[0], **tol)
    torch.testing.assert_close(out[1], ref[1], **tol)


def test_positions_are_per_token(cpu_isa):
    # packed documents: positions restart inside a row; each token must use its own position
    cos, sin = _tables(64)
    pos = torch.tensor([[0, 1, 2, 0, 1, 32767, 8192, 5]])
    q = torch.randn(1, 8, 4, 64)
    k = torch.randn(1, 8, 2, 64)
    q_out, k_out = ops.apply_rope(q, k, cos, sin, pos)
    for t in range(8):
        one = ops.apply_rope(q[:, t:t + 1], k[:, t:t + 1], cos, sin, pos[:, t:t + 1])
        assert torch.equal(q_out[:, t:t + 1], one[0]) and torch.equal(k_out[:, t:t + 1], one[1])
    assert torch.equal(q_out[:, 0], q[:, 0]) and torch.equal(k_out[:, 3], k[:, 3])  # position 0: identity


@pytest.mark.parametrize("interleaved", [False, True])
def test_backward_op_inverts_forward(interleaved, cpu_isa):
    cos, sin = _tables(80)
    q = torch.randn(2, 6, 4, 80, dtype=torch.float64)
    k = torch.randn(2, 6, 2, 80, dtype=torch.float64)
    pos = _positions(2, 6, "cpu")
    rq, rk = ops.apply_rope(q, k, cos, sin, pos, interleaved)
    bq, bk = torch.ops.exaone_ext.apply_rope_backward(rq, rk, cos, sin, pos, interleaved)
    torch.testing.assert_close(bq, q)
    torch.testing.assert_close(bk, k)


@pytest.mark.parametrize("interleaved", [False, True])
def test_gradcheck_float64(interleaved, cpu_isa):
    cos, sin = ops.rope_cos_sin(16, 40000, 1e6, LLAMA3)
    q = torch.randn(2, 3, 4, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 2, 16, dtype=torch.float64, requires_grad=True)
    pos = torch.tensor([[0, 5, 32767], [9000, 1, 39999]])
    fn = lambda a, b: ops.apply_rope(a, b, cos, sin, pos, interleaved)
    assert torch.autograd.gradcheck(fn, (q, k))
    assert torch.autograd.gradgradcheck(fn, (q, k))


def test_gradient_of_q_only():
    cos, sin = _tables(64)
    q = torch.randn(1, 4, 2, 64, requires_grad=True)
    k = torch.randn(1, 4, 1, 64)
    pos = torch.arange(4).view(1, 4)
    q_out, _ = ops.apply_rope(q, k, cos, sin, pos)
    q_out.sum().backward()
    ql = q.detach().clone().requires_grad_()
    reference.apply_rope(ql, k, cos, sin, pos)[0].sum().backward()
    torch.testing.assert_close(q.grad, ql.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
def test_opcheck(dtype, interleaved, device):
    cos, sin = ops.rope_cos_sin(32, 100, device=device)
    q = torch.randn(2, 5, 4, 32, device=device).to(dtype).requires_grad_()
    k = torch.randn(2, 5, 2, 32, device=device).to(dtype).requires_grad_()
    pos = torch.randint(0, 100, (2, 5), device=device)
    torch.library.opcheck(torch.ops.exaone_ext.apply_rope.default, (q, k, cos, sin, pos, interleaved))
    torch.library.opcheck(torch.ops.exaone_ext.apply_rope_backward.default,
                          (q.detach().requires_grad_(), k.detach().requires_grad_(), cos, sin, pos, interleaved))
    qkv = torch.randn(2, 5, 8 * 32, device=device).to(dtype)
    torch.library.opcheck(torch.ops.exaone_ext.apply_rope.default,
                          (qkv[..., :128].view(2, 5, 4, 32), qkv[..., 128:192].view(2, 5, 2, 32), cos, sin, pos[:1],
                           interleaved))
    torch.library.opcheck(torch.ops.exaone_ext.rope_cos_sin.default,
                          (torch.arange(50, device=device), 32, 1e6, True, 8.0, 1.0, 4.0, 8192.0))


def test_torch_compile_fullgraph():
    cos, sin = _tables(64)
    q = torch.randn(2, 7, 4, 64, requires_grad=True)
    k = torch.randn(2, 7, 2, 64, requires_grad=True)
    pos = _positions(2, 7, "cpu")

    def block(q, k):
        q2, k2 = ops.apply_rope(q, k, cos, sin, pos)
        return (q2 * 2).sum() + k2.square().sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(q, k)
    out.backward()
    ql, kl = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    rq, rk = reference.apply_rope(ql, kl, cos, sin, pos)
    ((rq * 2).sum() + rk.square().sum()).backward()
    torch.testing.assert_close(q.grad, ql.grad)
    torch.testing.assert_close(k.grad, kl.grad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty(dtype, device):
    cos, sin = ops.rope_cos_sin(64, 16, device=device)
    for qs, ks, ps in [((0, 5, 4, 64), (0, 5, 2, 64), (0, 5)), ((2, 0, 4, 64), (2, 0, 2, 64), (2, 0)),
                       ((2, 3, 0, 64), (2, 3, 0, 64), (2, 3))]:
        q = torch.empty(qs, dtype=dtype, device=device)
        k = torch.empty(ks, dtype=dtype, device=device)
        q_out, k_out = ops.apply_rope(q, k, cos, sin, torch.zeros(ps, dtype=torch.int64, device=device))
        assert q_out.shape == qs and k_out.shape == ks and q_out.dtype == dtype


@pytest.mark.parametrize("bad", [-1, MAX_POS, MAX_POS + 100, -(2**62)])
def test_positions_outside_table(bad, device, cpu_isa):
    cos, sin = _tables(64, device)
    q = torch.randn(2, 4, 4, 64, device=device)
    k = torch.randn(2, 4, 2, 64, device=device)
    pos = torch.randint(0, MAX_POS, (2, 4), device=device)
    pos[1, 2] = bad
    with pytest.raises(ValueError, match=rf"'position_ids' holds position {bad}, outside the cos/sin table of "
                                         rf"{MAX_POS} positions"):
        ops.apply_rope(q, k, cos, sin, pos)
    with pytest.raises(ValueError, match="'position_ids' holds position"):
        torch.ops.exaone_ext.apply_rope_backward(q, k, cos, sin, pos)


def test_bad_inputs():
    cos, sin = _tables(64)
    q = torch.randn(2, 3, 4, 64)
    k = torch.randn(2, 3, 2, 64)
    pos = torch.zeros(2, 3, dtype=torch.int64)
    cases = [
        ((q.int(), k.int(), cos, sin, pos), TypeError, "'q' must be float32, bfloat16 or float16"),
        ((q, k.half(), cos, sin, pos), TypeError, "'k' must have the same dtype as 'q'"),
        ((q, k, cos.double(), sin, pos), TypeError, "'cos' must be a float32 table"),
        ((q, k, cos, sin.half(), pos), TypeError, "'sin' must be a float32 table"),
        ((q, k, cos, sin, pos.int()), TypeError, "'position_ids' must be int64"),
        ((q, k, cos, sin, pos.float()), TypeError, "'position_ids' must be int64"),
        ((q, k[:1], cos, sin, pos), ValueError, "'k' must have the batch and seq dims of 'q'"),
        ((q, k[:, :2], cos, sin, pos), ValueError, "'k' must have the batch and seq dims of 'q'"),
        ((q, k[..., :32], cos, sin, pos), ValueError, "'k' must have the head_dim of 'q'"),
        ((q[..., :63], k[..., :63], cos, sin, pos), ValueError, "head_dim .* must be even, got 63"),
        ((q, k, cos[:, :16], sin, pos), ValueError, r"'cos' must have shape \[max_position, head_dim / 2 = 32\]"),
        ((q, k, cos, sin[None], pos), ValueError, r"'sin' must have shape \[max_position, head_dim / 2 = 32\]"),
        ((q, k, cos, sin[:100], pos), ValueError, "'sin' must have the same shape as 'cos'"),
        ((q, k, cos, sin, pos[:, :2]), ValueError, r"'position_ids' must have shape \[batch, seq\] = \[2, 3\]"),
        ((q, k, cos, sin, pos[0]), ValueError, r"'position_ids' must have shape \[batch, seq\]"),
        ((q[0], k[0], cos, sin, pos), ValueError, "'q' must be 4-dimensional"),
        ((q, k[0], cos, sin, pos), ValueError, "'k' must be 4-dimensional"),
        ((q, "k", cos, sin, pos), TypeError, "'k' must be a torch.Tensor"),
        ((q, k, cos, None, pos), TypeError, "'sin' must be a torch.Tensor"),
    ]
    for args, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            ops.apply_rope(*args)
    with pytest.raises(TypeError, match="'grad_q' must be float32, bfloat16 or float16"):
        torch.ops.exaone_ext.apply_rope_backward(q.int(), k.int(), cos, sin, pos)
    with pytest.raises(TypeError, match="'interleaved' must be a bool"):
        ops.apply_rope(q, k, cos, sin, pos, interleaved=1)
    with pytest.raises(ValueError, match="'position_ids' holds position 0, outside the cos/sin table of 0"):
        ops.apply_rope(q, k, cos[:0], sin[:0], pos)
    if CUDA:
        with pytest.raises(ValueError, match="'k' must be on the same device as 'q'"):
            ops.apply_rope(q, k.cuda(), cos, sin, pos)
        with pytest.raises(ValueError, match="'cos' must be on the same device as 'q'"):
            ops.apply_rope(q.cuda(), k.cuda(), cos, sin.cuda(), pos.cuda())
        with pytest.raises(ValueError, match="'position_ids' must be on the same device as 'q'"):
            ops.apply_rope(q.cuda(), k.cuda(), cos.cuda(), sin.cuda(), pos)


def test_mismatched_devices_without_gpu():
    # meta tensors stand in for a second device on a machine without a GPU
    cos, sin = _tables(64)
    q = torch.randn(2, 3, 4, 64)
    k = torch.randn(2, 3, 2, 64)
    pos = torch.zeros(2, 3, dtype=torch.int64)
    for i, name in enumerate(["k", "cos", "sin", "position_ids"]):
        args = [q, k, cos, sin, pos]
        args[i + 1] = args[i + 1].to("meta")
        with pytest.raises(ValueError, match=f"'{name}' must be on the same device as 'q'"):
            ops.apply_rope(*args)


def test_meta_device_traces():
    cos, sin = ops.rope_cos_sin(64, 100, device="meta")
    assert cos.shape == (100, 32) and cos.device.type == "meta"
    q = torch.empty(2, 3, 4, 64, device="meta")
    k = torch.empty(2, 3, 2, 64, device="meta")
    q_out, k_out = ops.apply_rope(q, k, cos, sin, torch.zeros(2, 3, dtype=torch.int64, device="meta"))
    assert q_out.shape == q.shape and k_out.shape == k.shape


def test_position_bound_from_the_caller(device):
    """position_ids_max: the same rotation; checked against the table; the backward keeps it."""
    cos, sin = ops.rope_cos_sin(32, 64, device=device)
    q = torch.randn(2, 5, 4, 32, device=device, requires_grad=True)
    k = torch.randn(2, 5, 2, 32, device=device, requires_grad=True)
    pos = torch.randint(0, 64, (2, 5), device=device)
    bound = int(pos.max())
    q1, k1 = ops.apply_rope(q, k, cos, sin, pos, position_ids_max=bound)
    q2, k2 = ops.apply_rope(q, k, cos, sin, pos)
    torch.testing.assert_close(q1, q2, rtol=0, atol=0)
    torch.testing.assert_close(k1, k2, rtol=0, atol=0)
    (q1.sum() + k1.square().sum()).backward()
    g = q.grad.clone(), k.grad.clone()
    q.grad = k.grad = None
    (q2.sum() + k2.square().sum()).backward()
    torch.testing.assert_close(g[0], q.grad, rtol=0, atol=0)
    torch.testing.assert_close(g[1], k.grad, rtol=0, atol=0)
    for bad in (64, -1):
        with pytest.raises(ValueError, match=rf"apply_rope: 'position_ids_max' must lie in the cos/sin table of 64 "
                                             rf"positions \(0 to 63\), got {bad}"):
            ops.apply_rope(q, k, cos, sin, pos, position_ids_max=bad)
    with pytest.raises(TypeError, match="apply_rope: 'position_ids_max' must be an int or None, got float"):
        ops.apply_rope(q, k, cos, sin, pos, position_ids_max=3.0)
    torch.library.opcheck(torch.ops.exaone_ext.apply_rope.default, (q.detach(), k.detach(), cos, sin, pos, False, bound))


def test_position_bound_does_not_hide_cpu_errors():
    """On the CPU every position is still checked, whatever the caller's bound says."""
    cos, sin = ops.rope_cos_sin(32, 64)
    q, k = torch.randn(1, 3, 2, 32), torch.randn(1, 3, 1, 32)
    pos = torch.tensor([[0, 5, 70]])
    with pytest.raises(ValueError, match="'position_ids' holds position 70, outside the cos/sin table of 64"):
        ops.apply_rope(q, k, cos, sin, pos, position_ids_max=10)
