import math

import pytest
import torch

from exaone_ext import ops
from exaone_ext.ops import reference
from conftest import CUDA, DEVICES, DTYPES, assert_error_within

ROWS = [1, 3, 17, 1000]
HIDDEN = [1, 7, 80, 2047, 2560, 4097, 5120]  # CUDA: warp rows, resident rows of 1-8 packs a thread, block rows


def _inputs(shape, dtype, device, wdtype=None, residual=False):
    x = torch.randn(shape, device=device).mul_(2).to(dtype)
    w = (1 + 0.3 * torch.randn(shape[-1], device=device)).to(wdtype or dtype)
    r = torch.randn(shape, device=device).to(dtype) if residual else None
    return x, r, w


def _run(fn, tensors, grads):
    """Calls fn on fresh leaves made from `tensors`; backward with `grads`; returns (outputs, input grads)."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(out, grads[:len(out)])
    return out, [t.grad for t in leaves]


def _check_against_reference(x, r, w, eps=1e-5):
    add = r is not None
    inputs = (x, r, w) if add else (x, w)
    dy = torch.randn_like(x)
    dh = torch.randn_like(x)
    grads = (dy, dh) if add else (dy,)
    ours_fn = (lambda a, b, c: ops.add_rms_norm(a, b, c, eps)) if add else (lambda a, c: ops.rms_norm(a, c, eps))
    ref_fn = (lambda a, b, c: reference.add_rms_norm(a, b, c, eps)) if add else (lambda a, c: reference.rms_norm(a, c, eps))
    out, g = _run(ours_fn, inputs, grads)
    ref_lp, g_lp = _run(ref_fn, inputs, grads)
    ref64, g64 = _run(ref_fn, [t.double() for t in inputs], [t.double() for t in grads])
    # reductions: y and the input gradients over the hidden size, dweight over the rows; h is a sum of
    # two. In bfloat16 / float16 the definition rounds to the dtype on the way (h, the normalised
    # value, its product with the weight): y counts those roundings, and the gradients, made of terms
    # holding the rounded normalised value, one rounding in the dtype per term (their sum: about
    # u * rms(result), up to ~2.5x that at the largest of thousands of outputs: k = 4).
    hidden, rows = x.shape[-1], x.numel() // max(1, x.shape[-1])
    low = x.dtype != torch.float32
    names, ks, rounds = ["y", "h"], [hidden, 1], [(3 if add else 2) if low else 1, 1]
    for o, o64, olp, name, k, n in zip(out, ref64, ref_lp, names, ks, rounds):
        assert o.dtype == x.dtype
        assert_error_within(o, o64, olp, name, k=k, roundings=n)
    gnames = ["dx", "dresidual", "dweight"] if add else ["dx", "dweight"]
    gks = [hidden, hidden, rows] if add else [hidden, rows]
    for gi, gi64, gilp, name, t, k in zip(g, g64, g_lp, gnames, inputs, gks):
        assert gi.dtype == t.dtype, name
        if low:
            assert_error_within(gi, gi64, gilp, name, k=4, acc_dtype=x.dtype, roundings=2)
        else:
            assert_error_within(gi, gi64, gilp, name, k=k)


@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("add", [False, True], ids=["rms_norm", "add_rms_norm"])
def test_matches_reference(add, dtype, rows, hidden, device, cpu_variant):
    x, r, w = _inputs((rows, hidden), dtype, device, residual=add)
    _check_against_reference(x, r, w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("add", [False, True], ids=["rms_norm", "add_rms_norm"])
def test_float32_weight_with_low_precision_x(add, dtype, device, cpu_variant):
    x, r, w = _inputs((2, 9, 80), dtype, device, wdtype=torch.float32, residual=add)
    _check_against_reference(x, r, w)
    y = ops.add_rms_norm(x, r, w)[0] if add else ops.rms_norm(x, w)
    assert y.dtype == dtype


def test_bf16_weight_with_float32_x(device, cpu_variant):
    x, _, w = _inputs((5, 33), torch.float32, device, wdtype=torch.bfloat16)
    _check_against_reference(x, None, w)


@pytest.mark.parametrize("eps", [1e-6, 1e-2])
def test_eps_and_tiny_rows(eps, cpu_variant):
    x = torch.randn(6, 80) * 1e-3
    x[2] = 0  # an all-zero row: rstd = 1/sqrt(eps), y = 0
    _check_against_reference(x, torch.randn(6, 80) * 1e-3, torch.randn(80), eps)
    _check_against_reference(x, None, torch.randn(80), eps)


def test_non_contiguous_inputs(device, cpu_variant):
    base = torch.randn(40, 2, 130, device=device)
    x = base[:, 0, 1:98]                                  # strided rows, offset start
    r = torch.randn(97, 40, device=device).t()            # last dim not contiguous
    w = torch.randn(194, device=device)[::2]              # strided weight
    torch.testing.assert_close(ops.rms_norm(x, w), reference.rms_norm(x, w))
    torch.testing.assert_close(ops.rms_norm(r, w), reference.rms_norm(r, w))
    y, h = ops.add_rms_norm(x, r, w)
    y_ref, h_ref = reference.add_rms_norm(x, r, w)
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(y, y_ref)
    # gradients with non-contiguous incoming gradients
    dy = torch.randn(97, 40, device=device).t()
    dh = torch.randn(40, 3, 97, device=device)[:, 1]
    _, g = _run(ops.add_rms_norm, (x, r, w), (dy, dh))
    _, g_ref = _run(reference.add_rms_norm, (x, r, w), (dy, dh))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # 3-d input and the backward op called on strided tensors directly
    x3 = torch.randn(3, 5, 2, 64, device=device)[:, :, 1]
    y3, rstd = torch.ops.exaone_ext.rms_norm(x3, w[:64], 1e-5)
    torch.testing.assert_close(y3, reference.rms_norm(x3, w[:64]))
    assert rstd.shape == (3, 5)
    dy3 = torch.randn(3, 5, 2, 64, device=device)[:, :, 0]
    dx, dw = torch.ops.exaone_ext.rms_norm_backward(dy3, x3, w[:64], rstd, None)
    _, (dx_ref, dw_ref) = _run(reference.rms_norm, (x3, w[:64]), (dy3,))
    torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("contiguous", [True, False])
def test_bf16_weight_each_call_its_own(contiguous, device, cpu_variant):
    """A bfloat16 weight is widened afresh for every call (on a CPU into a per-thread buffer where it
    is contiguous): two weights used in turn, and a weight changed in place between calls, give
    each call its own result; the backward's weight too."""
    x = torch.randn(7, 96, device=device).to(torch.bfloat16)
    r = torch.randn(7, 96, device=device).to(torch.bfloat16)
    ws = [torch.randn(192 if not contiguous else 96, device=device).to(torch.bfloat16) for _ in range(2)]
    if not contiguous:
        ws = [w[::2] for w in ws]
    for w in ws + ws:
        torch.testing.assert_close(ops.rms_norm(x, w), reference.rms_norm(x, w))
        y, h = ops.add_rms_norm(x, r, w)
        torch.testing.assert_close(y, reference.add_rms_norm(x, r, w)[0])
    w = ws[0]
    with torch.no_grad():
        w.mul_(-2)
    torch.testing.assert_close(ops.rms_norm(x, w), reference.rms_norm(x, w))
    dy = torch.randn(7, 96, device=device).to(torch.bfloat16)
    _, g = _run(ops.rms_norm, (x, w), (dy,))
    _, g_ref = _run(reference.rms_norm, (x, w), (dy,))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_special_values(cpu_variant):
    x = torch.tensor([[1.0, float("inf"), 2.0], [1.0, float("nan"), 2.0], [3e38, 3e38, 1.0], [0.0, 0.0, 0.0]])
    y = ops.rms_norm(x, torch.ones(3))
    ref = reference.rms_norm(x, torch.ones(3))
    torch.testing.assert_close(y, ref, equal_nan=True)


def test_weight_gradient_is_deterministic(cpu_variant):
    x, r, w = _inputs((1000, 2560), torch.bfloat16, "cpu", wdtype=torch.float32, residual=True)
    dy, dh = torch.randn_like(x), torch.randn_like(x)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 1, 2, max(threads, 1)):
            torch.set_num_threads(n)
            _, g = _run(ops.add_rms_norm, (x, r, w), (dy, dh))
            results.append(g)
    finally:
        torch.set_num_threads(threads)
    for g in results[1:]:
        for a, b in zip(g, results[0]):
            assert torch.equal(a.view(torch.uint8 if a.dtype != torch.float32 else torch.int32),
                               b.view(torch.uint8 if b.dtype != torch.float32 else torch.int32))


def test_gradcheck_float64(cpu_isa):
    x = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, c: ops.rms_norm(a, c, 1e-3), (x, w))
    assert torch.autograd.gradcheck(lambda a, b, c: ops.add_rms_norm(a, b, c, 1e-3), (x, r, w))
    x3 = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, c: ops.rms_norm(a, c[:5]), (x3, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype, device):
    x = torch.randn(5, 24, dtype=dtype, device=device, requires_grad=True)
    r = torch.randn(5, 24, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(24, dtype=dtype, device=device, requires_grad=True)
    lib = torch.ops.exaone_ext
    torch.library.opcheck(lib.rms_norm.default, (x, w, 1e-5))
    torch.library.opcheck(lib.rms_norm.default, (x, w.detach().float().requires_grad_(), 1e-5))
    torch.library.opcheck(lib.add_rms_norm.default, (x, r, w, 1e-5))
    _, rstd = lib.rms_norm(x.detach(), w.detach(), 1e-5)
    dy = torch.randn(5, 24, dtype=dtype, device=device)
    torch.library.opcheck(lib.rms_norm_backward.default, (dy, x.detach(), w.detach(), rstd, None))
    torch.library.opcheck(lib.rms_norm_backward.default, (dy, x.detach(), w.detach(), rstd, torch.randn_like(dy)))


def test_torch_compile_fullgraph():
    def block(x, r, w1, w2):
        y, h = ops.add_rms_norm(x, r, w1)
        return ops.rms_norm(y * 2, w2), h

    x, r, w = _inputs((4, 64), torch.float32, "cpu", residual=True)
    w2 = torch.randn(64)
    compiled = torch.compile(block, fullgraph=True)
    out, g = _run(compiled, (x, r, w, w2), (torch.randn(4, 64), torch.randn(4, 64)))
    out_ref, g_ref = _run(block, (x, r, w, w2), (torch.randn(4, 64), torch.randn(4, 64)))
    torch.testing.assert_close(out[0], out_ref[0])
    assert all(a is not None for a in g)


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty(dtype, device):
    x = torch.empty(0, 64, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(64, dtype=dtype, device=device, requires_grad=True)
    y = ops.rms_norm(x, w)
    assert y.shape == (0, 64)
    y.sum().backward()
    assert x.grad.shape == (0, 64) and torch.equal(w.grad, torch.zeros_like(w))
    y, h = ops.add_rms_norm(x, x, w)
    assert y.shape == h.shape == (0, 64)
    with pytest.raises(ValueError, match="last dimension of 'x'"):
        ops.rms_norm(torch.empty(3, 0, dtype=dtype, device=device), torch.empty(0, dtype=dtype, device=device))


def test_bad_inputs():
    x, w = torch.randn(4, 8), torch.randn(8)
    with pytest.raises(TypeError, match="'x' must be float32, bfloat16 or float16"):
        ops.rms_norm(torch.ones(4, 8, dtype=torch.int32), w)
    with pytest.raises(TypeError, match="'weight' must be float32, bfloat16 or float16"):
        ops.rms_norm(x, torch.ones(8, dtype=torch.int64))
    with pytest.raises(TypeError, match="'weight' must be float32, bfloat16 or float16"):
        ops.rms_norm(x, w.double())
    with pytest.raises(ValueError, match=r"'weight' must have shape \[8\]"):
        ops.rms_norm(x, torch.randn(9))
    with pytest.raises(ValueError, match=r"'weight' must have shape \[8\]"):
        ops.rms_norm(x, torch.randn(1, 8))
    with pytest.raises(ValueError, match="'residual' must have the same shape as 'x'"):
        ops.add_rms_norm(x, torch.randn(4, 9), w)
    with pytest.raises(ValueError, match="'residual' must have the same shape as 'x'"):
        ops.add_rms_norm(x, torch.randn(1, 8), w)
    with pytest.raises(TypeError, match="'residual' must have the same dtype as 'x'"):
        ops.add_rms_norm(x, x.half(), w)
    for eps in (0.0, -1e-5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="'eps' must be a finite number > 0"):
            ops.rms_norm(x, w, eps)
        with pytest.raises(ValueError, match="'eps' must be a finite number > 0"):
            ops.add_rms_norm(x, x, w, eps)
        with pytest.raises(ValueError, match="'eps' must be a finite number > 0"):
            torch.ops.exaone_ext.rms_norm(x, w, eps)
    with pytest.raises(TypeError, match="'eps' must be a float"):
        ops.rms_norm(x, w, "1e-5")
    with pytest.raises(TypeError, match="'weight' must be a torch.Tensor"):
        ops.rms_norm(x, [1.0] * 8)
    with pytest.raises(ValueError, match="at least 1 dimension"):
        ops.rms_norm(torch.tensor(1.0), torch.ones(1))
    with pytest.raises(ValueError, match="'weight' must be on the same device as 'x'"):
        ops.rms_norm(x, w.to("meta"))
    with pytest.raises(ValueError, match="'residual' must be on the same device as 'x'"):
        ops.add_rms_norm(x, x.to("meta"), w)
    if CUDA:
        with pytest.raises(ValueError, match="same device"):
            ops.rms_norm(x, w.cuda())
    # the backward op checks its own arguments
    _, rstd = torch.ops.exaone_ext.rms_norm(x, w, 1e-5)
    with pytest.raises(ValueError, match=r"'rstd' must have shape \[4\]"):
        torch.ops.exaone_ext.rms_norm_backward(x, x, w, rstd[:3], None)
    with pytest.raises(TypeError, match="'rstd' must be float"):
        torch.ops.exaone_ext.rms_norm_backward(x, x, w, rstd.half(), None)
    with pytest.raises(ValueError, match="'dy' must have the same shape as 'x'"):
        torch.ops.exaone_ext.rms_norm_backward(x[:2], x, w, rstd, None)
    with pytest.raises(ValueError, match="'dh' must have the same shape as 'x'"):
        torch.ops.exaone_ext.rms_norm_backward(x, x, w, rstd, x[:2])


def test_reference_used_without_kernel(no_kernel):
    """A device without kernels runs the reference: no exaone_ext op dispatched, its results."""
    x, r, w = torch.randn(3, 8, requires_grad=True), torch.randn(3, 8), torch.rand(8) + 0.5
    with no_kernel() as seen:
        y = ops.rms_norm(x, w)
        y.sum().backward()
        y2, h = ops.add_rms_norm(x.detach(), r, w)
    assert seen == set()
    assert torch.equal(y, reference.rms_norm(x, w))
    ref_y, ref_h = reference.add_rms_norm(x.detach(), r, w)
    assert torch.equal(y2, ref_y) and torch.equal(h, ref_h)
    x2 = x.detach().clone().requires_grad_()
    reference.rms_norm(x2, w).sum().backward()
    assert torch.equal(x.grad, x2.grad)


def test_meta_device_traces():
    x = torch.empty(3, 8, device="meta")
    w = torch.empty(8, device="meta")
    assert ops.rms_norm(x, w).shape == (3, 8)
    y, h = ops.add_rms_norm(x, x, w)
    assert y.shape == h.shape == (3, 8)
