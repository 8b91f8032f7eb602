"""The `make demo` job: exaone_ext end to end on the embedded default, with no download and no GPU.

1. What this build contains (CUDA kernels, CPU variant and features).
2. Each fused op beside PyTorch eager at EXAONE 3.5 2.4B shapes: error against float64, speed.
3. The demo model (exaone_ext.demo_model): a tiny bilingual EXAONE 3.5 that the package trained with
   its own recipe (two-stage pre-training, SFT, DPO) on a synthetic world of forty people. Shipped
   as a Hugging Face-layout checkpoint, loaded with from_pretrained; the recipe's numbers per stage,
   KV-cache decode == full recomputation, a live batch of fact questions, and Korean and English
   chat turns streamed through the generator.

    python -m exaone_ext.demo [--tokens 2048] [--repeats 10] [--model DIR] [--skip-ops]
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch

import exaone_ext
from exaone_ext import ops
from exaone_ext.ops import reference

HIDDEN, INTER, Q_HEADS, KV_HEADS, HEAD_DIM = 2560, 7168, 32, 8, 80  # EXAONE 3.5 2.4B
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


def _time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def _cases(tokens: int, dtype: torch.dtype):
    """(name, exaone_ext call, eager call, float64 reference call) on fresh random inputs."""
    g, u = (torch.randn(tokens, INTER, dtype=dtype) for _ in range(2))
    yield ("swiglu", lambda: ops.swiglu(g, u), lambda: reference.swiglu(g, u),
           lambda: reference.swiglu(g.double(), u.double()))
    x, r = (torch.randn(tokens, HIDDEN, dtype=dtype) for _ in range(2))
    w = (1 + 0.1 * torch.randn(HIDDEN)).to(dtype)
    yield ("rms_norm", lambda: ops.rms_norm(x, w, 1e-5), lambda: reference.rms_norm(x, w, 1e-5),
           lambda: reference.rms_norm(x.double(), w.double(), 1e-5))
    yield ("add_rms_norm", lambda: ops.add_rms_norm(x, r, w, 1e-5), lambda: reference.add_rms_norm(x, r, w, 1e-5),
           lambda: reference.add_rms_norm(x.double(), r.double(), w.double(), 1e-5))
    q = torch.randn(1, tokens, Q_HEADS, HEAD_DIM, dtype=dtype)
    k = torch.randn(1, tokens, KV_HEADS, HEAD_DIM, dtype=dtype)
    cos, sin = ops.rope_cos_sin(HEAD_DIM, 32768, 1e6, LLAMA3)
    pos = torch.arange(tokens)[None] + 20000  # beyond 8192, where llama3 scaling matters
    yield ("apply_rope", lambda: ops.apply_rope(q, k, cos, sin, pos), lambda: reference.apply_rope(q, k, cos, sin, pos),
           lambda: reference.apply_rope(q.double(), k.double(), cos, sin, pos))
    if hasattr(ops, "flash_attn"):
        s = min(tokens, 1024)
        qa, ka, va = q[:, :s], k[:, :s], torch.randn(1, s, KV_HEADS, HEAD_DIM, dtype=dtype)
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def eager_attn():
            return sdpa(qa.transpose(1, 2), ka.transpose(1, 2), va.transpose(1, 2), is_causal=True,
                        enable_gqa=True).transpose(1, 2)
        yield (f"flash_attn/{s}", lambda: ops.flash_attn(qa, ka, va, causal=True), eager_attn,
               lambda: reference.flash_attn(qa.double(), ka.double(), va.double(), causal=True))


def show_ops(tokens: int, repeats: int) -> None:
    print(f"\n[ops] EXAONE 3.5 2.4B shapes, {tokens} tokens, bfloat16, CPU. error = max |op - float64 reference|;"
          " eager = what PyTorch does without exaone_ext (SDPA for attention)")
    print(f"  {'op':<16}{'exaone_ext':>12}{'eager':>12}{'speed-up':>10}{'err ours':>11}{'err eager':>11}")
    for name, ours, eager, exact in _cases(tokens, torch.bfloat16):
        with torch.no_grad():
            ref = _first(exact())
            err_ours = (_first(ours()).double() - ref).abs().max().item()
            err_eager = (_first(eager()).double() - ref).abs().max().item()
            t_ours, t_eager = _time(ours, repeats), _time(eager, repeats)
        print(f"  {name:<16}{t_ours * 1e3:>10.2f}ms{t_eager * 1e3:>10.2f}ms{t_eager / t_ours:>9.2f}x"
              f"{err_ours:>11.2e}{err_eager:>11.2e}")


def show_model(path: str | None) -> None:
    from exaone_ext import GenerationConfig, KVCache, stream
    from exaone_ext.demo_model import WEIGHTS, load, recipe_results
    from exaone_ext.demo_model.evaluate import fact_answers, table
    from exaone_ext.demo_model.world import World, is_korean, question
    from exaone_ext.model import checkpoint_info

    path = path or str(WEIGHTS)
    info = checkpoint_info(path)
    t = time.perf_counter()
    model, tok = load(path)
    print(f"\n[model] the demo model, a tiny bilingual EXAONE 3.5 ({info['num_parameters']:,} parameters, "
          f"{info['dtypes']} on disk) trained by the package's own recipe (`make train-demo`); loaded from "
          f"{path} in {time.perf_counter() - t:.2f} s")
    results = recipe_results(path)
    print(f"  what the recipe measured after each stage ({results['seconds']['total']:.0f} s of training on "
          f"{results.get('machine', 'a 2-core CPU')}):")
    print("    " + table(results).replace("\n", "\n    "))

    ids = torch.tensor([tok.encode("미나는 부산에 살아요. Mina lives in Busan.")])
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, 1, ids.shape[1], torch.float32, "cpu")
        steps = torch.cat([model(ids[:, i:i + 1], kv_cache=cache) for i in range(ids.shape[1])], 1)
    err = (full - steps).abs().max().item()
    print(f"  KV-cache decode vs full recomputation over {ids.shape[1]} tokens: max |diff| = {err:.2e}")
    if not math.isfinite(err) or err > 1e-3:
        raise SystemExit("demo: KV-cache decode disagrees with the full forward")

    world = World(0)
    questions = world.fact_questions(world.sft_people[:4] + world.heldout_people[:2])
    t = time.perf_counter()
    replies = fact_answers(model, tok, questions)
    right = sum(q["value"] in r for q, r in zip(questions, replies))
    same_lang = sum(is_korean(r) == (q["lang"] == "ko") for q, r in zip(questions, replies))
    print(f"  live check, {len(questions)} fact questions in one batch ({time.perf_counter() - t:.2f} s): "
          f"{right} answered with the right word in the language asked, {same_lang} in the language asked")

    config = GenerationConfig(max_new_tokens=48, do_sample=False)
    p, q = world.sft_people[0], world.heldout_people[0]
    print(f"  chat (greedy). {p.en} is asked about in the SFT data; {q.en} is held out: known only from "
          "pre-training biographies, where the model is right about a third of the time")
    chats = [question(p, "city", "ko"), question(p, "job", "en"), question(p, "pet", "ko"), question(q, "city", "en"),
             question(q, "job", "ko")]
    broken = 0
    for question in chats:
        print(f"  user: {question}\n  assistant: ", end="", flush=True)
        s = stream(model, tok, [{"role": "user", "content": question}], config)
        text = ""
        for piece in s:
            text += piece
            print(piece, end="", flush=True)
        broken += text.count("\ufffd")
        r = s.result
        print(f"\n    ({len(r.tokens)} tokens, stopped by {r.stop_reason}, decode {r.decode_tokens_per_s:.0f} tok/s)")
    if broken:
        raise SystemExit(f"demo: {broken} broken characters (U+FFFD) in the replies")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048, help="tokens per op in the ops table")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--model", metavar="DIR", help="a demo-model checkpoint (default: the shipped weights)")
    p.add_argument("--skip-ops", action="store_true", help="leave out the ops table")
    args = p.parse_args(argv)

    info = exaone_ext.build_info()
    print(f"exaone_ext {info['version']} | torch {info['torch_version']} | CUDA kernels: "
          f"{'sm ' + ','.join(info['cuda_archs']) if info['cuda'] else 'not built'} | CPU kernels: "
          f"{info['cpu_isa']} ({', '.join(info['cpu_features']) or 'no vector extensions'}) | bf16 attention "
          f"products: {info['cpu_attention_bf16_products']} | bf16 linear "
          f"{'-'.join(map(str, info['cpu_linear_brgemm_rows']))} rows: {info['cpu_linear_bf16_rows']} "
          f"| threads {info['threads']}")
    if not args.skip_ops:
        show_ops(args.tokens, args.repeats)
    show_model(args.model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
