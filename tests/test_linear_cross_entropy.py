import pytest
import torch
import torch.nn.functional as F

from exaone_ext import ops
from exaone_ext.ops import reference
from exaone_ext.ops.linear_cross_entropy import default_chunk_size
from conftest import DEVICES, DTYPES, assert_error_within_pytorch

# (tokens, vocab, hidden, chunk): odd sizes, one and several chunks
SHAPES = [(1, 1000, 64, None), (17, 1, 64, 8), (97, 1000, 80, 32), (1025, 1000, 64, 256), (17, 32003, 80, None)]
REDUCTIONS = ["mean", "sum", "none"]


def _inputs(n, v, d, dtype, device="cpu", ignore_every=5):
    h = torch.randn(n, d, device=device).to(dtype)
    w = (torch.randn(v, d, device=device) * d ** -0.5 * 3).to(dtype)
    t = torch.randint(0, v, (n,), device=device)
    if ignore_every:
        t[::ignore_every] = -100
    return h, w, t


def _run_with(fn, h, w, t, reduction, g, **kw):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    loss = fn(h, w, t, reduction=reduction, **kw)
    loss.backward(g)
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,v,d,chunk", SHAPES)
def test_matches_float64_within_error_rule(n, v, d, chunk, dtype, reduction, device):
    h, w, t = _inputs(n, v, d, dtype, device)
    g = (torch.randn(t.shape, device=device) if reduction == "none" else torch.tensor(1.7, device=device))
    ours = _run_with(ops.linear_cross_entropy, h, w, t, reduction, g, chunk_size=chunk)
    same = _run_with(reference.linear_cross_entropy, h, w, t, reduction, g)
    ref64 = _run_with(reference.linear_cross_entropy, h.double(), w.double(), t, reduction, g.double())
    assert ours[0].dtype == torch.float32
    for name, a, b, c in zip(("loss", "grad hidden", "grad weight"), ours, ref64, same):
        assert_error_within_pytorch(a, b, c, name)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("n,v,d,chunk", [(1, 1, 64, None), (97, 1000, 80, 32), (1025, 1000, 64, 100)])
def test_float64_equals_f_cross_entropy(n, v, d, chunk, reduction):
    h, w, t = _inputs(n, v, d, torch.float64, ignore_every=5 if n > 1 else 0)  # all ignored: see below
    g = torch.randn(t.shape, dtype=torch.float64) if reduction == "none" else torch.tensor(0.3, dtype=torch.float64)
    loss, dh, dw = _run_with(ops.linear_cross_entropy, h, w, t, reduction, g, chunk_size=chunk)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = F.cross_entropy(F.linear(hh, ww), t, ignore_index=-100, reduction=reduction)
    ref.backward(g)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(dh, hh.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dw, ww.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_cpu_variant(dtype, cpu_isa):
    """The kernel of each ISA (vectors, tails of 1..size-1 columns) against float64."""
    for v in (1, 7, 1003):
        h, w, t = _inputs(45, v, 80, dtype)
        for reduction in ("mean", "none"):
            g = torch.randn(t.shape) if reduction == "none" else torch.tensor(1.0)
            ours = _run_with(ops.linear_cross_entropy, h, w, t, reduction, g, chunk_size=16)
            same = _run_with(reference.linear_cross_entropy, h, w, t, reduction, g)
            ref64 = _run_with(reference.linear_cross_entropy, h.double(), w.double(), t, reduction, g.double())
            for name, a, b, c in zip(("loss", "grad hidden", "grad weight"), ours, ref64, same):
                assert_error_within_pytorch(a, b, c, f"{name} (V={v}, {reduction})")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_ignored_and_none_ignored(reduction, device):
    h, w, t = _inputs(33, 101, 64, torch.float32, device, ignore_every=0)
    none_ignored = _run_with(ops.linear_cross_entropy, h, w, t, reduction,
                             torch.ones(t.shape, device=device) if reduction == "none" else torch.tensor(1.0, device=device),
                             chunk_size=8)
    ref = _run_with(reference.linear_cross_entropy, h, w, t, reduction,
                    torch.ones(t.shape, device=device) if reduction == "none" else torch.tensor(1.0, device=device))
    for a, b in zip(none_ignored, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    t_all = torch.full_like(t, -100)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = ops.linear_cross_entropy(hh, ww, t_all, reduction=reduction, chunk_size=8)
    assert torch.equal(loss, torch.zeros_like(loss))  # "mean" of nothing is 0, not NaN
    loss.sum().backward()
    assert torch.equal(hh.grad, torch.zeros_like(h)) and torch.equal(ww.grad, torch.zeros_like(w))


def test_custom_ignore_index_inside_the_vocabulary():
    h, w, t = _inputs(40, 50, 64, torch.float64, ignore_every=0)
    t[::3] = 7
    for reduction in REDUCTIONS:
        ours = ops.linear_cross_entropy(h, w, t, ignore_index=7, reduction=reduction, chunk_size=9)
        ref = F.cross_entropy(F.linear(h, w), t, ignore_index=7, reduction=reduction)
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_none_is_minus_token_log_probs_and_batched_shape():
    h = torch.randn(3, 11, 64, dtype=torch.float64)
    w = torch.randn(300, 64, dtype=torch.float64) * 0.2
    t = torch.randint(0, 300, (3, 11))
    t[0, :4] = -100
    loss = ops.linear_cross_entropy(h, w, t, reduction="none", chunk_size=5)
    assert loss.shape == (3, 11)
    logp = torch.log_softmax(h @ w.T, -1).gather(-1, t.clamp(min=0)[..., None])[..., 0]
    logp = torch.where(t == -100, 0.0, logp)
    torch.testing.assert_close(-loss, logp, rtol=1e-12, atol=1e-12)


def test_gradients_in_forward_equal_recomputed_in_backward():
    """reduction="sum" computes the gradients during forward; "none" summed recomputes each chunk's
    logits in backward. Both, and the backward op fed a 0-dim scale, agree."""
    h, w, t = _inputs(70, 513, 64, torch.float32)
    a = _run_with(ops.linear_cross_entropy, h, w, t, "sum", torch.tensor(2.0), chunk_size=16)
    b = _run_with(lambda *x, **k: ops.linear_cross_entropy(*x, **k).sum(), h, w, t, "none", torch.tensor(2.0),
                  chunk_size=16)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    # only one input requiring grad: forward computes only that gradient
    hh = h.clone().requires_grad_()
    ops.linear_cross_entropy(hh, w, t, reduction="sum", chunk_size=16).mul(2.0).backward()
    torch.testing.assert_close(hh.grad, a[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_retained_graph_and_partial_backwards(reduction, dtype, device):
    """Gradients made in forward: a second backward of a retained graph, and inputs asked for one at
    a time, each get the gradient of that call alone (scaled by its incoming gradient once)."""
    h, w, t = _inputs(45, 300, 32, dtype, device)
    want = _run_with(ops.linear_cross_entropy, h, w, t, reduction, torch.tensor(1.0, device=device), chunk_size=16)
    # bf16: the recomputing backward rounds scale * (softmax - onehot) to bf16 before its matmul, the
    # forward's gradients are rounded and then scaled: the same to within a few bf16 roundings of the
    # terms, which cancellation can make large against a small entry
    def close(got, ref):
        tol = dict(rtol=0, atol=3e-2 * float(ref.abs().max())) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, ref, **tol)

    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = ops.linear_cross_entropy(hh, ww, t, reduction=reduction, chunk_size=16)
    loss.mul(2.0).backward(retain_graph=True)
    close(hh.grad, want[1] * 2)
    close(ww.grad, want[2] * 2)
    hh.grad = ww.grad = None
    loss.mul(3.0).backward()
    close(hh.grad, want[1] * 3)
    close(ww.grad, want[2] * 3)
    # one input at a time through autograd.grad, then the other
    loss = ops.linear_cross_entropy(hh, ww, t, reduction=reduction, chunk_size=16)
    (gh,) = torch.autograd.grad(loss, hh, retain_graph=True)
    (gw,) = torch.autograd.grad(loss, ww, retain_graph=True)
    gh2, gw2 = torch.autograd.grad(loss, (hh, ww))
    for got, ref in ((gh, want[1]), (gw, want[2]), (gh2, want[1]), (gw2, want[2])):
        close(got, ref)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_float64(reduction, cpu_isa):
    h = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 6, -100, 3, 3, 1])
    fn = lambda a, b: ops.linear_cross_entropy(a, b, t, reduction=reduction, chunk_size=4)
    assert torch.autograd.gradcheck(fn, (h, w))


def test_non_contiguous_inputs(device):
    base = torch.randn(5, 40, 2, 80, device=device)
    h = base[:, :, 1, 3:67].transpose(0, 1)          # [40, 5, 64], strided
    w = torch.randn(64, 301, device=device).t()       # [301, 64], transposed
    t = torch.randint(0, 301, (5, 40), device=device).t()
    for reduction in REDUCTIONS:
        ours = ops.linear_cross_entropy(h, w, t, reduction=reduction, chunk_size=30)
        ref = reference.linear_cross_entropy(h, w, t, reduction=reduction)
        torch.testing.assert_close(ours, ref, rtol=2e-5, atol=2e-5)


def test_default_chunk_and_empty_input():
    assert default_chunk_size(8192, 102400, torch.bfloat16) == 640
    assert default_chunk_size(10, 102400, torch.bfloat16) == 10
    h = torch.empty(0, 64, requires_grad=True)
    w = torch.randn(10, 64, requires_grad=True)
    t = torch.empty(0, dtype=torch.int64)
    assert ops.linear_cross_entropy(h, w, t).item() == 0.0
    assert ops.linear_cross_entropy(h, w, t, reduction="none").shape == (0,)
    loss = ops.linear_cross_entropy(h, w, t, reduction="sum")
    loss.backward()
    assert torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype, device):
    h = torch.randn(13, 32, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(50, 32, dtype=dtype, device=device, requires_grad=True)
    t = torch.randint(0, 50, (13,), device=device)
    t[2] = -100
    op = torch.ops.exaone_ext.linear_cross_entropy.default
    for reduction, flags in ((0, False), (1, True), (2, True), (1, False)):
        torch.library.opcheck(op, (h, w, t, -100, reduction, 4, flags, flags))
    lse = op(h.detach(), w.detach(), t, -100, 0, 4, False, False)[1]
    torch.library.opcheck(torch.ops.exaone_ext.linear_cross_entropy_backward.default,
                          (torch.randn(13, device=device), h.detach(), w.detach(), t, lse, -100, 4, True, True))


def test_bad_inputs():
    h, w, t = _inputs(6, 10, 16, torch.float32, ignore_every=0)
    bad = t.clone()
    bad[4] = 10
    with pytest.raises(ValueError, match=r"linear_cross_entropy: 'targets' must be in \[0, 10\).*got 10 at position 4"):
        ops.linear_cross_entropy(h, w, bad)
    bad[4] = -1
    with pytest.raises(ValueError, match="'targets' must be in .*got -1 at position 4"):
        ops.linear_cross_entropy(h, w, bad, reduction="none")
    with pytest.raises(TypeError, match="'targets' must be int64"):
        ops.linear_cross_entropy(h, w, t.int())
    with pytest.raises(ValueError, match="'targets' must have the leading shape of 'hidden'"):
        ops.linear_cross_entropy(h, w, t[:5])
    with pytest.raises(ValueError, match=r"'weight' must be \[vocab, 16\]"):
        ops.linear_cross_entropy(h, torch.randn(10, 15), t)
    with pytest.raises(TypeError, match="'weight' must have the same dtype as 'hidden'"):
        ops.linear_cross_entropy(h, w.bfloat16(), t)
    with pytest.raises(TypeError, match="'hidden' must be float32, bfloat16 or float16"):
        ops.linear_cross_entropy(h.int(), w.int(), t)
    with pytest.raises(ValueError, match="'reduction' must be one of"):
        ops.linear_cross_entropy(h, w, t, reduction="avg")
    with pytest.raises(ValueError, match="'chunk_size' must be None or a positive int"):
        ops.linear_cross_entropy(h, w, t, chunk_size=0)
    with pytest.raises(ValueError, match="'weight' must have at least one row"):
        ops.linear_cross_entropy(h, torch.empty(0, 16), torch.full((6,), -100))
    with pytest.raises(TypeError, match="'weight' must be a torch.Tensor"):
        ops.linear_cross_entropy(h, None, t)
    with pytest.raises(ValueError, match="'chunk_size' must be a positive number of tokens"):
        torch.ops.exaone_ext.linear_cross_entropy(h, w, t, -100, 1, 0, False, False)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs the CUDA build and a GPU")
def test_cuda_out_of_range_target_is_nan_without_sync():
    h, w, t = _inputs(6, 10, 16, torch.float32, "cuda", ignore_every=0)
    t[2] = 99
    loss = ops.linear_cross_entropy(h, w, t, reduction="none")
    assert torch.isnan(loss[2]) and torch.isfinite(loss[torch.arange(6, device="cuda") != 2]).all()


def test_reference_used_without_kernel():
    h = torch.empty(4, 7, 16, device="meta")
    w = torch.empty(30, 16, device="meta")
    t = torch.empty(4, 7, dtype=torch.int64, device="meta")
    assert ops.linear_cross_entropy(h, w, t, reduction="none").shape == (4, 7)
    assert ops.linear_cross_entropy(h, w, t).shape == ()
