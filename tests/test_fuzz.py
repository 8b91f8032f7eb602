"""Property-based tests of every op (hypothesis): shapes, dtypes, strides (offsets, steps, transposes,
expanded and zero-size tensors), values (NaN, inf, huge) and every CPU kernel variant.

  valid input   -> the op equals its plain-PyTorch reference: forward and gradients within the error
                   rule of conftest.assert_error_within_pytorch; a NaN the float64 reference has is NaN here too
  invalid input -> TypeError / ValueError whose message names the op

The examples run in a child process (one for all the ops selected, started again after a crash), so
that a crash fails the test of its op, naming the signal and the example, instead of killing pytest.
Default: a bounded, reproducible run (derandomized). EXAONE_EXT_FUZZ_EXAMPLES=N runs N random
examples per op instead.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import traceback

import pytest
import torch

FUZZ_EXAMPLES = int(os.environ.get("EXAONE_EXT_FUZZ_EXAMPLES", "0"))
DEFAULT_EXAMPLES = {"flash_attn": 30, "flash_attn_varlen": 25, "flash_attn_with_kvcache": 30}
OPS = ["rms_norm", "add_rms_norm", "rope_cos_sin", "apply_rope", "swiglu", "swiglu_fused", "linear", "linear_cat",
       "flash_attn", "flash_attn_varlen", "flash_attn_with_kvcache"]


# ================================ parent side: pytest ==================================================

def _selected_ops(session) -> list[str]:
    ops = []
    for item in session.items:
        spec = getattr(item, "callspec", None)
        if getattr(item, "module", None) is not None and item.module.__name__ == __name__ and spec \
                and "op" in spec.params:
            ops.append(spec.params["op"])
    return [o for o in OPS if o in ops] or OPS


@pytest.fixture(scope="module")
def fuzz_results(request):
    """Runs the child until every selected op has a result; a child killed by a signal is charged to
    the op it was running (with its last example) and the next child goes on with the ops after it."""
    pending, results = _selected_ops(request.session), {}
    while pending:
        with tempfile.NamedTemporaryFile("r", suffix=".jsonl", delete=False) as f:
            log = f.name
        try:
            proc = subprocess.run([sys.executable, __file__, "--child", log, *pending], capture_output=True,
                                  text=True, timeout=1800)
            events = [json.loads(line) for line in open(log) if line.strip()]
        finally:
            os.unlink(log)
        running, last = None, None
        for e in events:
            if e["event"] == "start":
                running, last = e["op"], None
            elif e["event"] == "example":
                last = e["desc"]
            elif e["event"] in ("pass", "fail"):
                results[e["op"]] = e
                running = None
        if proc.returncode != 0 and running is None and not all(o in results for o in pending):
            raise RuntimeError(f"fuzz child failed outside any op (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        if running is not None:  # died inside an op
            how = (f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
                   else f"exited with status {proc.returncode}")
            results[running] = {"event": "crash", "op": running,
                                "error": f"the child process {how} while running {running} on the example\n"
                                         f"  {last}\nstderr tail:\n{proc.stderr[-3000:]}"}
        pending = [o for o in pending if o not in results]
    return results


@pytest.mark.parametrize("op", OPS)
def test_fuzz(op, fuzz_results):
    r = fuzz_results[op]
    assert r["event"] == "pass", f"{op}: {r['error']}"


# ================================ child side: the properties ===========================================

def _child(log_path: str, ops: list[str]) -> None:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    import exaone_ext  # noqa: F401
    from conftest import ATTN_BRGEMM, CPU_VARIANTS
    # "brgemm": avx512 with AVX512-BF16, attention's bf16 tile products and bf16 linear's 16-64 rows
    # through oneDNN's brgemm (the other variants have both off)
    variants = CPU_VARIANTS + (["brgemm"] if ATTN_BRGEMM else [])

    log = open(log_path, "a", buffering=1)
    last = {}

    def emit(**event):
        if event["event"] == "example":
            last["desc"] = event["desc"]
        log.write(json.dumps(event, default=str) + "\n")
        log.flush()
        os.fsync(log.fileno())

    for op in ops:
        emit(event="start", op=op)
        n = FUZZ_EXAMPLES or DEFAULT_EXAMPLES.get(op, 25)
        # the bounded profile reports the first failing example as drawn; the long one shrinks it
        phases = [Phase.explicit, Phase.generate] + ([Phase.shrink] if FUZZ_EXAMPLES else [])
        cfg = settings(max_examples=n, deadline=None, database=None, derandomize=not FUZZ_EXAMPLES,
                       suppress_health_check=list(HealthCheck), print_blob=False, phases=phases)
        prop = CHECKS[op]

        @cfg
        @given(data=st.data())
        def run(data):
            ex = Example(data, emit, op, variants)
            with ex.variant():
                prop(ex)

        try:
            run()
            emit(event="pass", op=op)
        except BaseException as e:  # a failing property: hypothesis has shrunk it and re-raised
            emit(event="fail", op=op, error=f"on the example {last.get('desc')}:\n"
                                           + "".join(traceback.format_exception(e))[-6000:])


class Example:
    """One drawn example: draws through hypothesis, remembers what it drew (written to the log before
    the op runs, so a crash names it), and builds tensors from a drawn seed."""

    def __init__(self, data, emit, op, variants):
        from hypothesis import strategies as st
        self.st, self.data, self.emit, self.op = st, data, emit, op
        self.desc: dict = {}
        self.isa = self.draw("variant", st.sampled_from(variants))
        self.gen = torch.Generator().manual_seed(self.draw("seed", st.integers(0, 2**31 - 1)))

    def draw(self, name, strategy):
        value = self.data.draw(strategy, label=name)
        self.desc[name] = value
        return value

    def choice(self, name, options):
        return self.draw(name, self.st.sampled_from(options))

    def integer(self, name, lo, hi):
        return self.draw(name, self.st.integers(lo, hi))

    def flag(self, name, p_true=0.5):
        return self.draw(name, self.st.floats(0, 1)) < p_true

    def commit(self):
        self.emit(event="example", op=self.op, desc=repr(self.desc))

    def variant(self):
        import contextlib

        import exaone_ext
        from exaone_ext import _C

        @contextlib.contextmanager
        def ctx():
            bf16 = self.isa in ("avx512bf16", "brgemm")
            before_isa, before_bf16 = exaone_ext.get_cpu_isa(), _C._set_cpu_avx512bf16(bf16)
            before_brgemm = _C._set_attn_brgemm(1 if self.isa == "brgemm" else 0)
            before_linear = _C._set_linear_brgemm(1 if self.isa == "brgemm" else 0)
            exaone_ext.set_cpu_isa("avx512" if bf16 else self.isa)
            try:
                yield
            finally:
                exaone_ext.set_cpu_isa(before_isa)
                _C._set_cpu_avx512bf16(before_bf16)
                _C._set_attn_brgemm(before_brgemm)
                _C._set_linear_brgemm(before_linear)
        return ctx()

    # ---- tensors ----

    def values(self, name, shape, dtype, scale=1.0, special=True):
        """Random values of `shape` in `dtype`; sometimes one NaN / inf / huge value."""
        t = torch.randn(shape, generator=self.gen, dtype=torch.float64) * scale
        kind = self.choice(f"{name}.special", [None] * 6 + ["nan", "inf", "-inf", "huge"]) if special else None
        if kind and t.numel():
            i = int(torch.randint(t.numel(), (1,), generator=self.gen))
            big = {torch.float16: 3e4, torch.bfloat16: 1e30, torch.float32: 1e30, torch.float64: 1e200}[dtype]
            t.view(-1)[i] = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "huge": big}[kind]
        return t.to(dtype)

    def layout(self, name, t, allow_expand=True, allow_last_step=True):
        """The values of t in a drawn memory layout: contiguous, at a storage offset, every other
        element of a dim, transposed in memory, expanded from one slice (values change), last dim strided."""
        kinds = (["contiguous", "offset", "step", "transpose"] + (["last_step"] if allow_last_step else [])
                 + (["expand"] if allow_expand else []))
        kind = self.choice(f"{name}.layout", kinds)
        if t.dim() == 0 or kind == "contiguous":
            return t
        d = self.integer(f"{name}.dim", 0, t.dim() - (1 if allow_last_step or t.dim() == 1 else 2))
        if kind == "offset":
            buf = torch.empty(t.numel() + 3, dtype=t.dtype)
            return buf[3:].view(t.shape).copy_(t)
        if kind in ("step", "last_step"):
            d = t.dim() - 1 if kind == "last_step" else d
            shape = list(t.shape)
            shape[d] *= 2
            idx = [slice(None)] * t.dim()
            idx[d] = slice(None, None, 2)
            return torch.empty(shape, dtype=t.dtype)[tuple(idx)].copy_(t)
        if kind == "transpose":  # with d and the next dim (never the last one when it must stay last)
            e = (d + 1) % (t.dim() if allow_last_step else t.dim() - 1)
            return t.transpose(d, e).contiguous().transpose(d, e) if d != e else t
        return t.narrow(d, 0, min(1, t.shape[d])).expand(t.shape) if t.shape[d] else t  # expand

    def tensor(self, name, shape, dtype, scale=1.0, special=True, allow_expand=True):
        return self.layout(name, self.values(name, shape, dtype, scale, special), allow_expand)


FLOATS = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def finite(*ts) -> bool:
    return all(bool(t.isfinite().all()) for t in ts if t.is_floating_point())


def check_close(name, out, ref64, ref_same, allowance=None):
    """out vs the float64 reference, within conftest's rule on the elements where both references
    are finite (plus `allowance`, elementwise, for designed roundings); NaN wherever the float64
    reference is NaN; matching infinities."""
    from conftest import assert_error_within_pytorch
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert out.dtype == ref_same.dtype, f"{name}: dtype {out.dtype} != {ref_same.dtype}"
    o, r, s = out.double(), ref64.double(), ref_same.double()
    missing = r.isnan() & ~o.isnan()
    assert not missing.any(), f"{name}: NaN of the reference lost at {missing.nonzero()[:5].tolist()}"
    extra = o.isnan() & ~r.isnan() & s.isfinite()
    assert not extra.any(), f"{name}: NaN where the references are finite, at {extra.nonzero()[:5].tolist()}"
    inf = r.isinf() & ~((o == r) | ~(s.isfinite() | o.isfinite()))
    assert not inf.any(), f"{name}: infinity of the reference not matched at {inf.nonzero()[:5].tolist()}"
    both = r.isfinite() & s.isfinite()
    if both.any():
        # rounding to a 16-bit dtype that PyTorch happens to get exactly right is not held against us
        floor = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2.0**-9, torch.float16: 2.0**-12}
        assert_error_within_pytorch(out[both], r[both], ref_same[both], name=name, floor=floor[out.dtype],
                                    extra=None if allowance is None else allowance[both.cpu()])


def expect_error(fn, *names):
    """fn must raise TypeError / ValueError naming one of exaone_ext.<names>."""
    try:
        fn()
    except (TypeError, ValueError) as e:
        msg = str(e)
        assert any(f"exaone_ext.{n}" in msg for n in names), f"message does not name the op {names}: {msg}"
        return
    raise AssertionError(f"no TypeError / ValueError raised (expected one naming {names})")


def three_ways(op, ref, args, diff, n_grad_outputs=None):
    """[kernel, float64 reference, same-dtype reference] lists of op(*args)'s outputs, followed, when
    every input is finite, by the gradients of sum(outputs[:n_grad_outputs] * g) w.r.t. args[diff]
    (g random, the same values for all three: rounded to the kernel's output dtype). The kernel gets
    the drawn views themselves."""
    def leaf(a, i, dtype=None):
        if not (isinstance(a, torch.Tensor) and a.is_floating_point()):
            return a
        a = a.detach() if dtype is None else a.detach().to(dtype)
        return a.requires_grad_() if i in diff else a
    runs = [(op, [leaf(a, i) for i, a in enumerate(args)]),
            (ref, [leaf(a, i, torch.float64) for i, a in enumerate(args)]),
            (ref, [leaf(a, i) for i, a in enumerate(args)])]
    with_grads = bool(diff) and finite(*[a for a in args if isinstance(a, torch.Tensor)])
    res, g_dtypes = [], None
    for fn, inputs in runs:
        outs = fn(*inputs)
        outs = list(outs) if isinstance(outs, tuple) else [outs]
        if with_grads:
            gen = torch.Generator().manual_seed(1234)
            used = outs[:n_grad_outputs]
            # the same upstream gradient for all three: drawn in float64, rounded to the kernel's output
            # dtype (what the kernel gets), then given to each run in its own dtype (exactly)
            g_dtypes = g_dtypes or [o.dtype for o in used]
            gs = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(gd).to(o.dtype)
                  for o, gd in zip(used, g_dtypes)]
            leaves = [inputs[i] for i in diff]
            # an empty output may come without a graph (the references build some with new_empty)
            pairs = [(o, g) for o, g in zip(used, gs) if o.requires_grad]
            grads = (torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True)
                     if pairs else [None] * len(leaves))
            outs += [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, leaves)]
        res.append([o.detach() for o in outs])
    return res


def compare(name, res, extra=None):
    """extra: {output index: elementwise allowance (check_close), or ("hull", v, allowed) (check_hull)}."""
    kern, r64, rsame = res
    assert len(kern) == len(r64) == len(rsame)
    for j, (a, b, c) in enumerate(zip(kern, r64, rsame)):
        allowance = (extra or {}).get(j)
        if isinstance(allowance, tuple):
            check_close(f"{name}[{j}]", a, b, c, torch.full(a.shape, math.inf, dtype=torch.float64))
            check_hull(f"{name}[{j}]", a, *allowance[1:])
        elif a.is_floating_point():
            check_close(f"{name}[{j}]", a, b, c, allowance)
        else:
            assert torch.equal(a, b), f"{name}[{j}]"


# ---- the ops ----------------------------------------------------------------------------------------

def lead_shape(ex, name, max_dims=3, max_size=5):
    nd = ex.integer(f"{name}.ndim", 0, max_dims)
    return [ex.integer(f"{name}.size{i}", 0 if ex.flag(f"{name}.zero{i}", 0.1) else 1, max_size) for i in range(nd)]


def check_rms_norm(ex, add=False):
    from exaone_ext import ops
    from exaone_ext.ops import reference
    name = "add_rms_norm" if add else "rms_norm"
    dtype = ex.choice("dtype", FLOATS)
    hidden = ex.choice("hidden", [1, 7, 64, 97, 256, 1000])
    shape = lead_shape(ex, "x") + [hidden]
    wdtype = ex.choice("weight_dtype", [dtype] + ([] if dtype == torch.float64 else [torch.float32, torch.bfloat16]))
    eps = ex.choice("eps", [1e-5, 1e-6, 0.1])
    x = ex.tensor("x", shape, dtype)
    res = ex.tensor("residual", shape, dtype) if add else None
    w = ex.tensor("weight", [hidden], wdtype, special=False)
    bad = ex.choice("invalid", [None] * 5 + ["empty_hidden", "weight_shape", "int_x", "eps", "scalar"])
    ex.commit()
    op = ops.add_rms_norm if add else ops.rms_norm
    ref = reference.add_rms_norm if add else reference.rms_norm
    args = [x, res, w] if add else [x, w]
    if bad:
        if bad == "empty_hidden":
            args[0] = torch.randn(*shape[:-1], 0, dtype=dtype)
            if add:
                args[1] = args[0].clone()
        elif bad == "weight_shape":
            args[-1] = torch.randn(hidden + 1, dtype=wdtype)
        elif bad == "int_x":
            args[0] = torch.ones(shape, dtype=torch.int32)
        elif bad == "scalar":
            args[0] = torch.tensor(1.0, dtype=dtype)
            if add:
                args[1] = args[0].clone()
        expect_error(lambda: op(*args, eps=-1.0 if bad == "eps" else eps), name, "rms_norm")
        return
    compare(name, three_ways(lambda *a: op(*a, eps=eps), lambda *a: ref(*a, eps=eps), args,
                             diff=(0, 1, 2) if add else (0, 1)))


def check_rope_cos_sin(ex):
    from exaone_ext import ops
    from exaone_ext.ops import reference
    head_dim = 2 * ex.integer("half", 1, 128)
    max_pos = ex.integer("max_position", 0, 300)
    theta = ex.choice("theta", [1e4, 5e5, 1e6, 10.0, 1.5])
    scaling = None
    if ex.flag("llama3"):
        scaling = {"rope_type": "llama3", "factor": ex.choice("factor", [1.0, 8.0, 32.0]),
                   "low_freq_factor": 1.0, "high_freq_factor": ex.choice("high", [2.0, 4.0]),
                   "original_max_position_embeddings": ex.choice("orig", [64, 8192])}
    bad = ex.choice("invalid", [None] * 4 + ["odd", "negative", "theta", "theta_str", "device", "scaling"])
    ex.commit()
    if bad:
        kw = dict(theta=theta, scaling=scaling)
        hd, mp = head_dim, max_pos
        if bad == "odd":
            hd = head_dim - 1
        elif bad == "negative":
            mp = -1 - max_pos
        elif bad == "theta":
            kw["theta"] = -theta
        elif bad == "theta_str":
            kw["theta"] = "abc"
        elif bad == "device":
            kw["device"] = "nope"
        else:
            kw["scaling"] = {"rope_type": "llama3", "factor": 8.0}
        expect_error(lambda: ops.rope_cos_sin(hd, mp, **kw), "rope_cos_sin")
        return
    cos, sin = ops.rope_cos_sin(head_dim, max_pos, theta, scaling)
    rc, rs = reference.rope_cos_sin(head_dim, max_pos, theta, scaling)
    assert cos.shape == rc.shape == (max_pos, head_dim // 2) and cos.dtype == torch.float32
    # both are computed in float64 and rounded once: at most a float32 ulp apart
    torch.testing.assert_close(cos, rc, atol=2e-7, rtol=0)
    torch.testing.assert_close(sin, rs, atol=2e-7, rtol=0)


def check_apply_rope(ex):
    from exaone_ext import ops
    from exaone_ext.ops import reference
    dtype = ex.choice("dtype", FLOATS)
    b, s = ex.integer("batch", 0, 3), ex.integer("seq", 0, 6)
    hq, hk = ex.integer("q_heads", 0, 4), ex.integer("kv_heads", 0, 3)
    d = ex.choice("head_dim", [2, 8, 64, 80, 128])
    table = ex.integer("table", 1, 40)
    cos, sin = ops.rope_cos_sin(d, table, ex.choice("theta", [1e4, 1e6]))
    cos, sin = ex.layout("cos", cos, allow_expand=False), ex.layout("sin", sin, allow_expand=False)
    pos = torch.randint(table, (1 if ex.flag("shared_positions", 0.3) else b, s), generator=ex.gen)
    pos = ex.layout("position_ids", pos)
    q, k = ex.tensor("q", [b, s, hq, d], dtype), ex.tensor("k", [b, s, hk, d], dtype)
    inter = ex.flag("interleaved")
    bad = ex.choice("invalid", [None] * 5 + ["position", "odd_dim", "table_width", "int32_pos", "k_batch",
                                            "interleaved"])
    ex.commit()
    if bad:
        if bad == "position" and pos.numel() and q.numel() + k.numel():
            pos = pos.clone(memory_format=torch.contiguous_format)
            pos.view(-1)[0] = table + ex.integer("past", 0, 5) if ex.flag("above") else -1
        elif bad == "odd_dim":
            q, k = torch.randn(b, s, hq, d + 1, dtype=dtype), torch.randn(b, s, hk, d + 1, dtype=dtype)
        elif bad == "table_width":
            cos = sin = torch.randn(table, d // 2 + 1)
        elif bad == "int32_pos":
            pos = pos.int()
        elif bad == "k_batch":
            k = torch.randn(b + 1, s, hk, d, dtype=dtype)
        elif bad == "interleaved":
            inter = "yes"
        else:
            return  # nothing to rotate: every position is valid
        expect_error(lambda: ops.apply_rope(q, k, cos, sin, pos, inter), "apply_rope")
        return
    compare("apply_rope", three_ways(lambda q, k: ops.apply_rope(q, k, cos, sin, pos, inter),
                                     lambda q, k: reference.apply_rope(q, k, cos, sin, pos, inter), [q, k], diff=(0, 1)))


def check_swiglu(ex, fused=False):
    from exaone_ext import ops
    from exaone_ext.ops import reference
    dtype = ex.choice("dtype", FLOATS)
    inter = ex.choice("intermediate", [1, 3, 16, 33, 256, 1000])
    shape = lead_shape(ex, "x")
    bad = ex.choice("invalid", [None] * 5 + ["shape", "dtype", "int", "odd", "scalar"])
    if fused:
        gu = ex.tensor("gate_up", shape + [2 * inter], dtype, scale=3.0)
        args = [gu]
    else:
        args = [ex.tensor("gate", shape + [inter], dtype, scale=3.0), ex.tensor("up", shape + [inter], dtype)]
    ex.commit()
    if bad:
        if bad == "shape" and not fused:
            args[1] = torch.randn(*shape, inter + 1, dtype=dtype)
        elif bad == "dtype" and not fused:
            args[1] = args[1].to(torch.float32 if dtype != torch.float32 else torch.float16)
        elif bad == "int":
            args[0] = torch.ones(args[0].shape, dtype=torch.int64)
        elif bad == "odd" and fused:
            args[0] = torch.randn(*shape, 2 * inter + 1, dtype=dtype)
        elif bad == "scalar":
            args = [torch.tensor(1.0, dtype=dtype)] * len(args)
        else:
            return
        expect_error(lambda: ops.swiglu(*args), "swiglu")
        return
    compare("swiglu", three_ways(ops.swiglu, reference.swiglu, args, diff=tuple(range(len(args)))))


def check_linear(ex, cat=False):
    from exaone_ext import ops
    from exaone_ext.ops import reference
    dtype = ex.choice("dtype", FLOATS)
    rows = lead_shape(ex, "x", max_dims=2, max_size=20)
    k = ex.choice("in_features", [0, 1, 7, 64, 130])
    x = ex.tensor("x", rows + [k], dtype, special=False)
    n_w = ex.integer("n_weights", 1, 3) if cat else 1
    ws = [ex.tensor(f"w{i}", [ex.choice(f"out{i}", [0, 1, 5, 33, 64]), k], dtype, scale=0.2, special=False)
          for i in range(n_w)]
    bad = ex.choice("invalid", [None] * 5 + ["in_features", "dtype", "rank", "empty_list", "not_tensor"])
    ex.commit()
    name = "linear_cat" if cat else "linear"
    if bad:
        if bad == "in_features":
            ws[-1] = torch.randn(3, k + 1, dtype=dtype)
        elif bad == "dtype":
            ws[-1] = ws[-1].to(torch.float32 if dtype != torch.float32 else torch.bfloat16)
        elif bad == "rank":
            ws[-1] = torch.randn(3, k, 1, dtype=dtype)
        elif bad == "empty_list" and cat:
            ws = []
        elif bad == "not_tensor":
            ws[-1] = [[1.0] * k]
        else:
            return
        expect_error(lambda: ops.linear_cat(x, ws) if cat else ops.linear(x, ws[0]), name, "linear")
        return
    if cat:
        res = three_ways(lambda x, *w: ops.linear_cat(x, list(w)), lambda x, *w: reference.linear_cat(x, list(w)),
                         [x, *ws], diff=tuple(range(n_w + 1)))
    else:
        res = three_ways(ops.linear, reference.linear, [x, ws[0]], diff=(0, 1))
    compare(name, res)


HEAD_DIMS = [64, 80, 96, 128, 256]


def attn_inputs(ex, dtype, lead_q, lead_k, hq, hk, d, nan_key_ok):
    """q, k, v with drawn layouts; a drawn NaN / inf / huge value goes into q, or into key 0 of k or v
    when every query sees key 0 (nan_key_ok): a value no query sees takes part in no result."""
    where = ex.choice("special_in", [None] * 4 + ["q", "k", "v"])
    kinds = ex.choice("special", ["nan", "inf", "huge"]) if where else None
    q = ex.values("q", lead_q + [hq, d], dtype, special=False)
    k = ex.values("k", lead_k + [hk, d], dtype, special=False)
    v = ex.values("v", lead_k + [hk, d], dtype, special=False)
    t = {"q": q, "k": k, "v": v}.get(where)
    if t is not None and t.numel() and (where == "q" or nan_key_ok):
        big = 3e4 if dtype == torch.float16 else 1e30
        val = {"nan": math.nan, "inf": math.inf, "huge": big}[kinds]
        if where == "q":
            t.view(-1)[int(torch.randint(t.numel(), (1,), generator=ex.gen))] = val
        else:
            t.view(-1, hk, d)[0, int(torch.randint(hk, (1,), generator=ex.gen)), 3] = val
    return q, k, v


def attn_extra(res, q, k, v, scale, allowed):
    """Elementwise allowances for flash attention's outputs [out, lse, dq, dk, dv] (out only without
    gradients), by output index; None where an input is not finite.

    Well-conditioned logits: conftest.attention_rounding_bounds (the designed roundings, and the
    logits' own rounding carried into P). dout is the gradient three_ways drew (generator seeded
    1234, float64 rounded to the dtype).
    Ill-conditioned logits (a drawn huge value makes the rounding of the logits themselves, up to
    u * head_dim * |scale| * sum |q k| in the accumulation dtype, exceed 1e-3): the softmax of such
    logits may rightly come out anywhere between its extremes, so out is held to the convex hull of
    the values its query sees (check_hull), lse to the logits' rounding, and the gradients to their
    NaN / infinity pattern only."""
    from conftest import UNIT_ROUNDOFF, attention_products_rounded, attention_rounding_bounds
    out = res[0][0]
    if not finite(q, k, v) or q.numel() == 0 or k.numel() == 0:
        return None
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    g = q.shape[2] // k.shape[2]
    u_acc = UNIT_ROUNDOFF[torch.float64 if out.dtype == torch.float64 else torch.float32]
    logits_abs = torch.einsum("bqhd,bkhd->bhqk", q.double().abs(), k.double().abs().repeat_interleave(g, 2))
    wobble = (u_acc * q.shape[-1] * abs(scale) * logits_abs).masked_fill(~allowed[:, None], 0.0).amax(-1)
    if wobble.max().item() > 1e-3:
        extra = {0: ("hull", v, allowed), 1: 2 * wobble.reshape(res[0][1].shape)}
        extra.update({j: torch.full(res[0][j].shape, math.inf, dtype=torch.float64) for j in range(2, len(res[0]))})
        return extra
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1234), dtype=torch.float64).to(out.dtype)
    b = attention_rounding_bounds(q, k, v, dout.reshape(q.shape), out.reshape(q.shape), scale, allowed, out.dtype,
                                  products_rounded=attention_products_rounded(out.device, out.dtype), logits=True)
    if not all(torch.isfinite(t).all() for t in b.values()):
        return None
    names = {0: "out"} if len(res[0]) < 5 else {0: "out", 2: "dq", 3: "dk", 4: "dv"}
    return {j: b[n].reshape(res[0][j].shape) for j, n in names.items()}


def check_hull(name, out, v, allowed):
    """Each output element lies between the smallest and largest value of its column over the keys
    its query sees (a softmax-weighted mean can be nothing else), within the roundings of forming it;
    0 where it sees none. out [..., sq, hq, d] as q; v [b, sk, hk, d]; allowed [b, sq, sk]."""
    from conftest import UNIT_ROUNDOFF
    b, sk, hk, d = v.shape
    o = out.double().reshape(b, -1, out.shape[-2], d)
    g = o.shape[2] // hk
    ve = v.double().repeat_interleave(g, 2)  # [b, sk, hq, d]
    vis = allowed[:, :, :, None, None]  # [b, sq, sk, 1, 1]
    lo = torch.where(vis, ve[:, None], math.inf).amin(2)
    hi = torch.where(vis, ve[:, None], -math.inf).amax(2)
    none = ~allowed.any(-1)[:, :, None, None].expand_as(o)
    # a weighted mean of n values, formed and normalised in floating point: (n + 2) roundings at most
    n = allowed.sum(-1)[:, :, None, None].double()
    slack = (n + 2) * UNIT_ROUNDOFF[out.dtype] * torch.maximum(lo.abs(), hi.abs()).nan_to_num(0.0, 0.0, 0.0)
    bad = torch.where(none, o != 0, (o < lo - slack) | (o > hi + slack))
    assert not bad.any(), (f"{name}: output outside the values its query sees at {bad.nonzero()[:5].tolist()} "
                           f"(ill-conditioned logits)")


def check_flash_attn(ex):
    from exaone_ext import ops
    from exaone_ext.ops import reference
    dtype = ex.choice("dtype", FLOATS)
    b, sq, sk = ex.integer("batch", 0, 2), ex.integer("seq_q", 0, 20), ex.choice("seq_k", [0, 1, 5, 17, 20, 70])
    hk, g, d = ex.integer("kv_heads", 1, 2), ex.integer("group", 1, 3), ex.choice("head_dim", HEAD_DIMS)
    causal = ex.flag("causal")
    scale = ex.choice("softmax_scale", [None, None, 0.05, 1.0])
    q, k, v = attn_inputs(ex, dtype, [b, sq], [b, sk], hk * g, hk, d, nan_key_ok=not causal or sq <= sk)
    q, k, v = ex.layout("q", q), ex.layout("k", k), ex.layout("v", v)
    bad = ex.choice("invalid", [None] * 6 + ["heads", "head_dim", "dtype", "rank", "scale", "scale_nan"])
    ex.commit()
    if bad:
        if bad == "heads":
            k = v = torch.randn(b, sk, hk * g + 1, d, dtype=dtype)
        elif bad == "head_dim":
            q, k, v = (torch.randn(*t.shape[:-1], 65, dtype=dtype) for t in (q, k, v))
        elif bad == "dtype":
            v = v.to(torch.float32 if dtype != torch.float32 else torch.float16)
        elif bad == "rank":
            q = q.flatten(0, 1)
        elif bad == "scale":
            scale = "abc"
        else:
            scale = math.nan
        expect_error(lambda: ops.flash_attn(q, k, v, causal, scale), "flash_attn")
        return
    res = three_ways(lambda q, k, v: ops.flash_attn(q, k, v, causal, scale, return_lse=True),
                     lambda q, k, v: reference.flash_attn(q, k, v, causal, scale, return_lse=True),
                     [q, k, v], diff=(0, 1, 2), n_grad_outputs=1)  # the LSE is not differentiable
    from conftest import causal_mask
    compare("flash_attn", res, attn_extra(res, q, k, v, scale, causal_mask(sq, sk, causal, b)))


def check_flash_attn_varlen(ex):
    from exaone_ext import ops
    from exaone_ext.ops import reference
    dtype = ex.choice("dtype", FLOATS)
    n = ex.integer("docs", 0, 3)
    lq = [ex.integer(f"len_q{i}", 0, 9) for i in range(n)]
    lk = [ex.integer(f"len_k{i}", 0, 9) for i in range(n)]
    pad_q, pad_k = ex.integer("pad_q", 0, 2), ex.integer("pad_k", 0, 2)  # rows outside every sequence
    hk, g, d = ex.integer("kv_heads", 1, 2), ex.integer("group", 1, 3), ex.choice("head_dim", HEAD_DIMS)
    causal = ex.flag("causal")
    cu_q = torch.tensor([pad_q] + [pad_q + sum(lq[:i + 1]) for i in range(n)], dtype=torch.int32)
    cu_k = torch.tensor([pad_k] + [pad_k + sum(lk[:i + 1]) for i in range(n)], dtype=torch.int32)
    total_q, total_k = int(cu_q[-1]) + pad_q, int(cu_k[-1]) + pad_k
    max_q, max_k = max(lq, default=0) + ex.integer("extra_q", 0, 2), max(lk, default=0)
    nan_ok = all(a <= c for a, c in zip(lq, lk)) or not causal
    nan_ok = nan_ok and n == 1 and pad_k == 0 and pad_q == 0
    q, k, v = attn_inputs(ex, dtype, [total_q], [total_k], hk * g, hk, d, nan_key_ok=nan_ok)
    q, k, v = ex.layout("q", q), ex.layout("k", k), ex.layout("v", v)
    cu_q, cu_k = ex.layout("cu_seqlens_q", cu_q), ex.layout("cu_seqlens_k", cu_k)
    lq, lk = torch.diff(cu_q).tolist(), torch.diff(cu_k).tolist()  # an expanded layout repeats the first offset
    bad = ex.choice("invalid", [None] * 6 + ["decreasing", "past_end", "max_short", "int64", "max_list", "lengths"])
    ex.commit()
    if bad:
        if bad == "decreasing" and n >= 2 and lq[0] > 0:
            cu_q = cu_q.clone(memory_format=torch.contiguous_format)
            a, c = int(cu_q[1]), int(cu_q[2])
            cu_q[1], cu_q[2] = c + 1, a
        elif bad == "past_end":
            cu_k = cu_k.clone(memory_format=torch.contiguous_format)
            cu_k[-1] = total_k + 1
        elif bad == "max_short" and max(lk, default=0) > 0:
            max_k -= 1
        elif bad == "int64":
            cu_q = cu_q.long()
        elif bad == "max_list":
            max_q = [max_q]
        elif bad == "lengths":
            cu_k = torch.cat([cu_k, cu_k[-1:]])
        else:
            return
        expect_error(lambda: ops.flash_attn_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal), "flash_attn_varlen")
        return
    res = three_ways(lambda q, k, v: ops.flash_attn_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal,
                                                           return_lse=True),
                     lambda q, k, v: reference.flash_attn_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal,
                                                                 return_lse=True),
                     [q, k, v], diff=(0, 1, 2), n_grad_outputs=1)
    from conftest import varlen_mask
    compare("flash_attn_varlen", res,
            attn_extra(res, q[None], k[None], v[None], None, varlen_mask(cu_q, cu_k, causal, total_q, total_k)))


def check_flash_attn_with_kvcache(ex):
    from exaone_ext import ops
    from exaone_ext.ops import reference
    dtype = ex.choice("dtype", FLOATS)
    b = ex.integer("batch", 0, 3)
    max_seq = ex.choice("max_seq", [1, 3, 17, 40, 700, 1300])
    s_new = ex.integer("s_new", 0, 3) if ex.flag("with_new") else None
    s_q = s_new if s_new is not None else ex.integer("s_q", 0, 3)
    room = max_seq - (s_new or 0)
    if room < 0:
        s_new = s_q = max_seq
        room = 0
    lens = [ex.integer(f"len{i}", 0, room) if not ex.flag(f"empty{i}", 0.15) else 0 for i in range(b)]
    seqlens = ex.layout("cache_seqlens", torch.tensor(lens, dtype=torch.int32))
    lens = seqlens.tolist()  # an expanded layout repeats the first length
    hk, g, d = ex.integer("kv_heads", 1, 2), ex.integer("group", 1, 4), ex.choice("head_dim", HEAD_DIMS)
    causal = ex.flag("causal")
    bound = max(lens, default=0) + ex.integer("bound_extra", 0, 2) if ex.flag("bound") else None
    if bound is not None and bound + (s_new or 0) > max_seq:
        bound = None
    every_row_sees_0 = all(n + (s_new or 0) > 0 for n in lens) and (not causal or s_q <= min(
        [n + (s_new or 0) for n in lens], default=0))
    q, kc, vc = attn_inputs(ex, dtype, [b, s_q], [b, max_seq], hk * g, hk, d, nan_key_ok=every_row_sees_0)
    q = ex.layout("q", q)
    # the caches are written in place: never expanded; their last dim must be contiguous (documented)
    kc = ex.layout("k_cache", kc, allow_expand=False, allow_last_step=False)
    vc = ex.layout("v_cache", vc, allow_expand=False, allow_last_step=False)
    kn = vn = None
    if s_new is not None:
        kn = ex.tensor("k_new", [b, s_new, hk, d], dtype, special=False)
        vn = ex.tensor("v_new", [b, s_new, hk, d], dtype, special=False)
    bad = ex.choice("invalid", [None] * 6 + ["too_long", "negative", "int64", "bound", "only_k", "new_heads",
                                            "cache_last_dim"])
    ex.commit()
    if bad:
        if bad == "too_long" and b:
            seqlens = seqlens.clone(memory_format=torch.contiguous_format)
            seqlens[-1] = max_seq - (s_new or 0) + 1
        elif bad == "negative" and b:
            seqlens = seqlens.clone(memory_format=torch.contiguous_format)
            seqlens[0] = -1
        elif bad == "int64":
            seqlens = seqlens.long()
        elif bad == "bound" and b and max(lens) > 0:
            bound = max(lens) - 1
        elif bad == "only_k" and kn is not None:
            vn = None
        elif bad == "new_heads" and kn is not None:
            kn = vn = torch.randn(b, s_new, hk + 1, d, dtype=dtype)
        elif bad == "cache_last_dim" and kc.numel():
            kc = torch.randn(b, max_seq, hk, 2 * d, dtype=dtype)[..., ::2]
        else:
            return
        expect_error(lambda: ops.flash_attn_with_kvcache(q, kc, vc, seqlens, kn, vn, causal,
                                                         cache_seqlens_max=bound),
                     "flash_attn_with_kvcache", "flash_attn_kvcache")
        return
    # the references get copies of the caches (they write k_new / v_new too); the kernel the views
    runs = [(ops.flash_attn_with_kvcache, kc, vc, lambda t: t),
            (reference.flash_attn_with_kvcache, kc.double(), vc.double(), lambda t: t.double()),
            (reference.flash_attn_with_kvcache, kc.clone(), vc.clone(), lambda t: t)]
    outs = []
    for fn, kcc, vcc, c in reversed(runs):  # the kernel last: kc / vc are written in place
        out = fn(c(q), kcc, vcc, seqlens, None if kn is None else c(kn), None if vn is None else c(vn), causal,
                 cache_seqlens_max=bound)
        outs.insert(0, [out, kcc, vcc])
    compare("flash_attn_with_kvcache", outs)


CHECKS = {
    "rms_norm": check_rms_norm,
    "add_rms_norm": lambda ex: check_rms_norm(ex, add=True),
    "rope_cos_sin": check_rope_cos_sin,
    "apply_rope": check_apply_rope,
    "swiglu": check_swiglu,
    "swiglu_fused": lambda ex: check_swiglu(ex, fused=True),
    "linear": check_linear,
    "linear_cat": lambda ex: check_linear(ex, cat=True),
    "flash_attn": check_flash_attn,
    "flash_attn_varlen": check_flash_attn_varlen,
    "flash_attn_with_kvcache": check_flash_attn_with_kvcache,
}


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "--child":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    _child(sys.argv[2], sys.argv[3:])
