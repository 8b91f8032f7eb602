"""Shared test helpers: the error rule for low-precision kernels, device and CPU-variant params, a
recorder of the exaone_ext ops that run, and the end-of-run note of what this machine could not cover.

The error rule (assert_error_within) holds a kernel's largest error against a float64 oracle to twice
a yardstick computed from the float64 result alone (error_budget), never from PyTorch's result on
this machine (oneDNN's float32 matmul, say, is blocked differently on an AMX Xeon and on Zen, so the
verdict would move with the CPU). Per op, the yardstick is:
  SwiGLU, RoPE (k = 1, 2)      the float64 result rounded to the dtype, plus float32 rounding of the result
  RMSNorm (k = hidden)         the same plus a float32 sum of squares over the hidden size; dweight: rows
  linear (k = in_features)     the same plus a float32 dot product of in_features terms; dx: out_features,
                               dweight: rows of x
  attention (k = keys)         the same plus float32 sums over the keys (out, lse, dq), over the queries of
                               a kv head (dk, dv), plus, per element, the roundings flash attention makes
                               by design (attention_rounding_bounds: D from the stored 16-bit output, P and
                               dS rounded into 16-bit tile products where the kernel does that)
where "a float32 sum of k terms" is u32 * sqrt(k) * rms(result): what a well-ordered accumulation (a
few interleaved partial sums, blocked or pairwise) loses; one running sum over thousands of products
loses more, and is what the rule is there to catch. Oracles: the float64 plain-PyTorch references
(python/exaone_ext/ops/reference), themselves held against PyTorch's building blocks and transformers
in tests/test_oracles.py."""
from __future__ import annotations

import contextlib
import math
import os

import pytest
import torch
import torch.utils._python_dispatch

import exaone_ext

# keep_freed_memory changes the whole process's malloc; the CLI and trainer tests run in this one
# (tests/test_training.py::test_keep_freed_memory checks it in processes of their own)
os.environ["EXAONE_EXT_KEEP_FREED_MEMORY"] = "0"

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CUDA = torch.cuda.is_available() and exaone_ext.build_info()["cuda"]
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
# Every CPU kernel variant this machine can run; the tests run each one.
CPU_ISAS = [i for i in ("avx512", "avx2", "scalar") if i in exaone_ext.build_info()["cpu_isa_compiled"]]
_BEST = exaone_ext.build_info()["cpu_isa_best"]
CPU_ISAS = CPU_ISAS[CPU_ISAS.index(_BEST):] if _BEST in CPU_ISAS else ["scalar"]


# Unit roundoff (half the gap above 1) of each dtype.
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def error_budget(ref64: torch.Tensor, dtype: torch.dtype, k: int = 1,
                 acc_dtype: torch.dtype | None = None, roundings: int = 1) -> float:
    """The yardstick of the error rule, from the float64 result alone (no computation in `dtype` on
    this machine, so the same on every CPU, BLAS and thread count):

        rounding      max |fl_dtype(ref64) - ref64|: what the best possible result in `dtype` loses
        accumulation  u(acc_dtype) * sqrt(k) * rms(ref64): what a sum of k terms loses in a
                      well-ordered accumulation (blocked or several accumulators) in `acc_dtype`

    k is the op's reduction length: 1 for elementwise ops (SwiGLU, RoPE), the hidden size for RMSNorm,
    in_features for linear's output (out_features for dx, rows for dweight), the key length for
    attention. acc_dtype is float32 by default (every kernel accumulates float32/bfloat16/float16 in
    float32; float64 in float64); flash attention on GPUs forms P @ V from P rounded to the input dtype,
    which those tests say with acc_dtype=dtype. roundings: how many times the op's definition rounds
    to `dtype` on the way to the output (RMSNorm: the normalised value, then its product with the
    weight), each worth up to the output's own rounding."""
    if ref64.numel() == 0:
        return 0.0
    ref64 = ref64.double()
    rounding = (ref64.to(dtype).double() - ref64).abs().max().item()
    if acc_dtype is None:
        acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    rms = ref64.square().mean().sqrt().item()
    return roundings * rounding + UNIT_ROUNDOFF[acc_dtype] * math.sqrt(k) * rms


def assert_error_within(out: torch.Tensor, ref64: torch.Tensor, ref_same_dtype: torch.Tensor | None = None,
                        name: str = "output", factor: float = 2.0, floor: float | None = None, *,
                        k: int = 1, acc_dtype: torch.dtype | None = None, roundings: int = 1,
                        extra: torch.Tensor | None = None) -> None:
    """The error rule: the kernel's max error against a float64 reference must be at most `factor`
    times error_budget(ref64, out.dtype, k) (plus a tiny floor for exact cases).

    The yardstick used to be plain PyTorch's own error in the same dtype on this machine, which moves
    with the CPU's BLAS (oneDNN blocks float32 matmuls differently on AMX Xeons and on Zen), so the
    same kernel passed on one machine and failed on another. `ref_same_dtype` (PyTorch computing the
    same thing in out.dtype) is still accepted: its dtype must match and its error is printed next to
    a failure, for context; it no longer decides.

    `extra`: an elementwise allowance (float64, out's shape) added to the budget of each element, for
    roundings of intermediates that the op's algorithm makes by design and that the scalar yardstick
    cannot describe (attention_rounding_bounds); it must be derived from the algorithm, never a
    fudge factor."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    if ref_same_dtype is not None:
        assert out.dtype == ref_same_dtype.dtype, f"{name}: dtype {out.dtype} != {ref_same_dtype.dtype}"
    if out.numel() == 0:
        return
    err = (out.double() - ref64.double()).abs()
    budget = error_budget(ref64, out.dtype, k, acc_dtype, roundings)
    if floor is None:
        floor = {torch.float64: 1e-12, torch.float32: 1e-6}.get(out.dtype, 1e-4)
    floor = floor * max(1.0, ref64.abs().max().item())
    if extra is None:
        ours = err.max().item()
        if ours <= factor * budget + floor:
            return
    else:
        assert extra.shape == out.shape, f"{name}: extra allowance of shape {tuple(extra.shape)}"
        excess = err - factor * extra.double().to(err.device)
        ours = excess.max().item()
        if ours <= factor * budget + floor:
            return
        at = tuple(torch.unravel_index(excess.argmax(), excess.shape))
        name = f"{name} (at {[int(i) for i in at]}: error {err[at].item():.3g}, allowance {extra[at].item():.3g})"
    theirs = ""
    if ref_same_dtype is not None:
        theirs = f"; PyTorch's own {out.dtype} error here: {(ref_same_dtype.double() - ref64.double()).abs().max().item():.3g}"
    raise AssertionError(f"{name}: max error {ours:.3g}{'' if extra is None else f' beyond {factor}x the allowance'} vs float64 "
                         f"reference exceeds {factor}x the {out.dtype} budget {budget:.3g} (k={k}) + {floor:.1g}{theirs}")


def attention_rounding_bounds(q, k, v, dout, out, scale: float, allowed: torch.Tensor, dtype: torch.dtype, *,
                              products_rounded: bool, logits: bool = False) -> dict[str, torch.Tensor]:
    """Elementwise allowances (float64) for the roundings flash attention makes by design, from the
    float64 quantities of the inputs and the kernel's own stored output `out`:

      D: the backward forms D = rowsum(dout * out) from the stored output, rounded to `dtype` (it has
         nothing else; as FlashAttention), so its gradients are those of that D: the allowance is the
         exact effect of out's rounding, |scale (D - D_used) (P . K)| for dq and the like for dk (zero
         in float64, negligible in float32). The forward's test holds `out` itself to the error rule.
      products_rounded: the tile products take P and dS rounded to `dtype` (bfloat16 pairs on
         AVX512-BF16 CPUs; 16-bit MMA operands on GPUs): each term of P . V, P^T . dout, dS . K,
         dS^T . Q is off by up to u |term| (u = UNIT_ROUNDOFF[dtype]); independent roundings add up as
         u sqrt(sum term^2), the model error_budget uses for a sum of k terms.
      logits: P = exp(S - lse) is recomputed in the backward from the logits and the saved float32
         log-sum-exp, so with large logits (a drawn softmax scale) P carries their rounding: relative
         error e = 2 u_acc sqrt(d) |scale| max_j sum |q k_j| per query row, into P . V (through
         V_j - out), P^T . dout and dS = P (dP - D). Off by default: the tests with ordinary logits
         keep the scalar budget's float32 terms tight.

    q [b, sq, hq, d], k / v [b, sk, hk, d], dout / out [b, sq, hq, d]; allowed[b, sq, sk]: which keys
    each query sees (causal, sequence boundaries). Returns {"out", "dq", "dk", "dv"} of the inputs' shapes;
    assert_error_within adds them to its budget."""
    q, k, v, dout, out = (t.detach().double().cpu() for t in (q, k, v, dout, out))
    g = q.shape[2] // k.shape[2]
    b, sk, hk, d = k.shape
    ke, ve = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, ke) * scale
    s = s.masked_fill(~allowed.cpu()[:, None], float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)  # rows without keys: no probabilities
    o = torch.einsum("bhqk,bkhd->bqhd", p, ve)
    dp = torch.einsum("bqhd,bkhd->bhqk", dout, ve)
    ds = p * (dp - (dout * o).sum(-1).transpose(1, 2)[..., None])
    d_off = ((dout * o).sum(-1) - (dout * out).sum(-1)).transpose(1, 2)[..., None]  # D - D_used, [b, h, q, 1]

    def per_kv_head(x):  # [b, sk, hq, d] -> [b, sk, hk, d]: the group's heads share a kv head
        return x.reshape(b, sk, hk, g, d).sum(3)

    dq = (abs(scale) * torch.einsum("bhqk,bkhd->bqhd", p * d_off, ke)).abs()
    dk = (abs(scale) * per_kv_head(torch.einsum("bhqk,bqhd->bkhd", p * d_off, q))).abs()
    res = {"out": torch.zeros_like(out), "dq": dq, "dk": dk, "dv": torch.zeros_like(v)}
    if logits:
        u_acc = UNIT_ROUNDOFF[torch.float64 if dtype == torch.float64 else torch.float32]
        qk = torch.einsum("bqhd,bkhd->bhqk", q.abs(), ke.abs()).masked_fill(~allowed.cpu()[:, None], 0.0)
        e = 2 * u_acc * math.sqrt(d) * abs(scale) * qk.amax(-1, keepdim=True)  # [b, h, q, 1]
        pe = p * e
        res["out"] = torch.einsum("bhqk,bqkhd->bqhd", pe, (ve[:, None] - o[:, :, None]).abs())
        res["dv"] = per_kv_head(torch.einsum("bhqk,bqhd->bkhd", pe, dout.abs()))
        dsa = pe * (dp - (dout * o).sum(-1).transpose(1, 2)[..., None]).abs()
        res["dq"] = dq + abs(scale) * torch.einsum("bhqk,bkhd->bqhd", dsa, ke.abs())
        res["dk"] = dk + abs(scale) * per_kv_head(torch.einsum("bhqk,bqhd->bkhd", dsa, q.abs()))
    if products_rounded and dtype != torch.float64:
        u = UNIT_ROUNDOFF[dtype]
        res["out"] = res["out"] + u * torch.einsum("bhqk,bkhd->bqhd", p.square(), ve.square()).sqrt()
        res["dv"] = res["dv"] + u * per_kv_head(torch.einsum("bhqk,bqhd->bkhd", p.square(), dout.square())).sqrt()
        dq, dk = res["dq"], res["dk"]
        res["dq"] = dq + u * abs(scale) * torch.einsum("bhqk,bkhd->bqhd", ds.square(), ke.square()).sqrt()
        res["dk"] = dk + u * abs(scale) * per_kv_head(torch.einsum("bhqk,bqhd->bkhd", ds.square(), q.square())).sqrt()
    return res


def causal_mask(sq: int, sk: int, causal: bool, batch: int = 1) -> torch.Tensor:
    """allowed[batch, sq, sk] of dense attention: all keys, or bottom-right causal (row i sees keys up to
    i + sk - sq)."""
    i, j = torch.arange(sq)[:, None], torch.arange(sk)[None]
    allowed = (j <= i + (sk - sq)) if causal else torch.ones(sq, sk, dtype=torch.bool)
    return allowed.expand(batch, sq, sk)


def varlen_mask(cu_q, cu_k, causal: bool, total_q: int, total_k: int) -> torch.Tensor:
    """allowed[1, total_q, total_k] of packed sequences: each query sees its own sequence's keys
    (bottom-right causal within it); rows outside every sequence see none."""
    allowed = torch.zeros(total_q, total_k, dtype=torch.bool)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for i in range(len(cq) - 1):
        allowed[cq[i]:cq[i + 1], ck[i]:ck[i + 1]] = causal_mask(cq[i + 1] - cq[i], ck[i + 1] - ck[i], causal)[0]
    return allowed[None]


def attention_products_rounded(device, dtype: torch.dtype) -> bool:
    """Whether flash attention on `device` takes P and dS rounded to `dtype` into its tile products now:
    16-bit dtypes on CUDA; bfloat16 on CPUs where bf16 products are active (AVX512-BF16, or oneDNN's
    brgemm: build_info()["cpu_attention_bf16_products"] other than "float32")."""
    if dtype not in (torch.bfloat16, torch.float16):
        return False
    if str(device).startswith("cuda"):
        return True
    return dtype == torch.bfloat16 and exaone_ext.build_info()["cpu_attention_bf16_products"] != "float32"


def assert_error_within_pytorch(out: torch.Tensor, ref64: torch.Tensor, ref_same_dtype: torch.Tensor,
                                name: str = "output", factor: float = 2.0, floor: float | None = None, *,
                                extra: torch.Tensor | None = None) -> None:
    """The error rule with PyTorch's own error in the same dtype as the yardstick, for the two places
    where the float64-only budget does not model the op's definition:
    - linear_cross_entropy is defined as cross-entropy of the library matmul's logits in the input
      dtype (`F.linear` in bf16 rounds every logit to bf16): its error follows that matmul's, and the
      yardstick must be the same computation;
    - the property tests (test_fuzz.py) draw values (huge, NaN neighbours, hidden size 1, mixed weight
      dtypes) where the definition rounds on the way in ways error_budget's `roundings` / `acc_dtype`
      do not describe case by case.
    Elsewhere use assert_error_within."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert out.dtype == ref_same_dtype.dtype, f"{name}: dtype {out.dtype} != {ref_same_dtype.dtype}"
    ours = (out.double() - ref64.double()).abs().max().item() if out.numel() else 0.0
    theirs = (ref_same_dtype.double() - ref64.double()).abs().max().item() if out.numel() else 0.0
    # never below the best possible result's own rounding: where PyTorch happens to round its largest
    # elements well, a kernel that rounds once, correctly, must not fail
    theirs = max(theirs, error_budget(ref64, out.dtype, 1, torch.float64) if out.numel() else 0.0)
    if floor is None:
        floor = {torch.float64: 1e-12, torch.float32: 1e-6}.get(out.dtype, 1e-4)
    floor = floor * max(1.0, ref64.abs().max().item() if ref64.numel() else 1.0)
    if extra is not None and out.numel():  # as in assert_error_within: designed roundings, per element
        ours = ((out.double() - ref64.double()).abs() - factor * extra.double().to(out.device)).max().item()
    assert ours <= factor * theirs + floor, (
        f"{name}: max error {ours:.3g}{'' if extra is None else f' beyond {factor}x the allowance'} vs float64 "
        f"reference exceeds {factor}x PyTorch's own {out.dtype} error {theirs:.3g} (+{floor:.1g})")


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(params=CPU_ISAS)
def cpu_isa(request):
    """Runs a test once per CPU kernel variant (avx512 / avx2 / scalar where this CPU has them)."""
    before = exaone_ext.get_cpu_isa()
    exaone_ext.set_cpu_isa(request.param)
    yield request.param
    exaone_ext.set_cpu_isa(before)


# The elementwise kernels (SwiGLU, RMSNorm) also have an AVX512-BF16 variant that replaces avx512
# where the CPU has it; tests of those ops run it as one more variant and avx512 without it.
HAS_AVX512BF16 = ("avx512" in CPU_ISAS and "avx512bf16" in exaone_ext.build_info()["cpu_extra_kernels"]
                  and "avx512bf16" in exaone_ext.build_info()["cpu_features"])
CPU_VARIANTS = (["avx512bf16"] if HAS_AVX512BF16 else []) + CPU_ISAS


@pytest.fixture(params=CPU_VARIANTS)
def cpu_variant(request):
    """As cpu_isa, plus the AVX512-BF16 variant of the elementwise kernels ("avx512" runs without it)."""
    from exaone_ext import _C
    before_isa = exaone_ext.get_cpu_isa()
    before_bf16 = _C._set_cpu_avx512bf16(request.param == "avx512bf16")
    exaone_ext.set_cpu_isa("avx512" if request.param == "avx512bf16" else request.param)
    yield request.param
    exaone_ext.set_cpu_isa(before_isa)
    _C._set_cpu_avx512bf16(before_bf16)


def _brgemm_available(switch: str, info_key: str) -> bool:
    """Whether oneDNN's brgemm runs bfloat16 here: the op family's switch (`_C.<switch>`) set to
    "wherever it works", then build_info's report of its engine."""
    from exaone_ext import _C
    before = getattr(_C, switch)(1)
    try:
        return exaone_ext.build_info()[info_key].startswith("oneDNN brgemm")
    finally:
        getattr(_C, switch)(before)


# Engines of CPU bfloat16 attention's tile products: the kernels' own, and oneDNN's brgemm (the
# default where the CPU has AMX-BF16; it runs wherever oneDNN has AVX-512, so it is tested there too).
ATTN_BRGEMM = _brgemm_available("_set_attn_brgemm", "cpu_attention_bf16_products")
# bfloat16 linear's 16-64 rows through brgemm (the default wherever it runs)
LINEAR_BRGEMM = _brgemm_available("_set_linear_brgemm", "cpu_linear_bf16_rows")
ATTN_ENGINES = ["own"] + (["brgemm"] if ATTN_BRGEMM else [])
# Every CPU attention call of the suite starts from NaN-filled scratch, so a kernel that reads a
# scratch element it never wrote fails its test every time rather than now and then.
exaone_ext._C._set_attn_poison_scratch(True)


@pytest.fixture(params=ATTN_ENGINES)
def attn_engine(request):
    """Runs a CPU attention test with each engine of the bfloat16 tile products."""
    from exaone_ext import _C
    before = _C._set_attn_brgemm(1 if request.param == "brgemm" else 0)
    yield request.param
    _C._set_attn_brgemm(before)


@pytest.fixture(params=["decode", "general"])
def attn_decode(request):
    """Runs a CPU KV-cache attention test with the decode kernels (one pass over the cache for all kv
    heads: AVX2, or AVX512-BF16 for bfloat16, where the CPU has them) and with the general kernel."""
    from exaone_ext import _C
    before = _C._set_attn_decode(request.param == "decode")
    yield request.param
    _C._set_attn_decode(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class _OpRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the exaone_ext ops dispatched while active (their names, e.g. "flash_attn_varlen")."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "exaone_ext":
            self.seen.add(func._opname)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def record_kernel_ops():
    """with record_kernel_ops() as seen: ... -> `seen`, the names of the exaone_ext ops that ran."""
    recorder = _OpRecorder()
    with recorder:
        yield recorder.seen


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny EXAONE checkpoint (exaone_ext.testing, seed 0) shared by a test module."""
    from exaone_ext.testing import write_tiny_checkpoint
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny models
    gain nothing from threads, and on a busy machine their hand-offs dominate."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def no_kernel(monkeypatch):
    """A context manager that makes the CPU a device without kernels (has_kernel False, as for a
    device this build has no kernels for) and records the exaone_ext ops that still run."""
    import importlib
    for name in ("linear", "rms_norm", "swiglu", "rope", "attention"):
        module = importlib.import_module(f"exaone_ext.ops.{name}")
        monkeypatch.setattr(module, "has_kernel", lambda device: False)
    return record_kernel_ops


# ---- what this run could not cover, said at the end of the run -------------------------------------
def _not_covered() -> list[str]:
    info = exaone_ext.build_info()
    lines = []
    if not torch.cuda.is_available():
        lines.append("CUDA: no device (CUDA kernels and the cuda-marked tests not run)")
    elif not info["cuda"]:
        lines.append("CUDA: this build has no CUDA kernels (CUDA tests not run)")
    for isa, flag in (("avx512", "AVX-512"), ("avx2", "AVX2")):
        if isa not in CPU_ISAS:
            why = "not compiled in this build" if isa not in info["cpu_isa_compiled"] else f"CPU lacks {flag}"
            lines.append(f"{isa} kernels: {why}")
    if "avx512bf16" not in info["cpu_features"]:
        lines.append("avx512bf16 kernels (bf16 dot linear, SwiGLU, RMSNorm, decode attention): CPU lacks AVX512-BF16")
    elif "avx512bf16" not in info["cpu_extra_kernels"]:
        lines.append("avx512bf16 kernels: not compiled in this build")
    if exaone_ext.get_cpu_isa() != info["cpu_isa_best"] and os.environ.get("EXAONE_EXT_CPU_ISA"):
        lines.append(f"EXAONE_EXT_CPU_ISA={os.environ['EXAONE_EXT_CPU_ISA']}: variants above it not run")
    return lines


def pytest_collection_modifyitems(config, items):
    for item in items:  # cases parametrized onto the GPU carry the cuda marker too
        params = getattr(item, "callspec", None)
        if params is not None and params.params.get("device") == "cuda":
            item.add_marker(pytest.mark.cuda)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    reasons: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        reasons[reason] = reasons.get(reason, 0) + 1
    lines = _not_covered()
    if not lines and not reasons:
        return
    terminalreporter.section("not covered on this machine")
    for line in lines:
        terminalreporter.line(line)
    for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
        terminalreporter.line(f"skipped {n}: {reason}")
