"""Training throughput and peak memory: exaone_ext's training step against transformers' Llama.

    .venv/bin/python benchmarks/bench_training.py [--layers 8 --hidden 512 --seq 1024 --batch 1 --steps 3]

The same model (8 layers, hidden 512, GQA 8/2, head dim 64, vocab 102400) and the same batch of
random tokens, trained with AdamW for a few steps: exaone_ext through the trainer's own step
(packed rows, fused linear + cross-entropy on the hidden states with its gradients made in the
forward, fused AdamW) and transformers' LlamaForCausalLM (SDPA attention) in a plain PyTorch loop
(default AdamW; also shown with fused AdamW). Each side runs in a
child process, so that its peak memory (CPU: the peak resident set less the model, inputs,
optimizer state and gradients; GPU: torch.cuda.max_memory_allocated over what the step keeps) is
its own; the sides alternate, best-of-rounds timing. On CPU exaone_ext's side keeps freed memory
for reuse as the trainer does ([train] keep_freed_memory); "exaone-malloc" is the same step without.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_now_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args) -> dict:
    import torch
    torch.manual_seed(0)
    device = torch.device(args.device)
    dims = dict(hidden=args.hidden, layers=args.layers, heads=8, kv=2, head_dim=64, inter=args.hidden * 3,
                vocab=args.vocab)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else None
    if args.side.startswith("exaone"):
        from exaone_ext import ExaoneConfig, ExaoneForCausalLM
        from exaone_ext.data import Row, collate
        from exaone_ext import keep_freed_memory
        from exaone_ext.training import token_nll_sum
        if device.type == "cpu" and args.side == "exaone":
            keep_freed_memory()  # as the trainer does on CPU ([train] keep_freed_memory, default true)
        config = ExaoneConfig(vocab_size=dims["vocab"], hidden_size=dims["hidden"], num_layers=dims["layers"],
                              num_attention_heads=dims["heads"], num_key_value_heads=dims["kv"],
                              head_dim=dims["head_dim"], intermediate_size=dims["inter"],
                              max_position_embeddings=max(2048, args.seq), tie_word_embeddings=False)
        model = ExaoneForCausalLM(config).to(device)
        model.reset_parameters()
        rows = [Row(r.tolist(), r[1:].tolist() + [-100], [args.seq]) for r in tokens]
        batch = collate(rows).to(device)

        def loss_fn():  # the trainer's pre-training objective
            return token_nll_sum(model, batch) / batch.num_targets
    else:
        from transformers import LlamaConfig, LlamaForCausalLM
        config = LlamaConfig(vocab_size=dims["vocab"], hidden_size=dims["hidden"], num_hidden_layers=dims["layers"],
                             num_attention_heads=dims["heads"], num_key_value_heads=dims["kv"],
                             head_dim=dims["head_dim"], intermediate_size=dims["inter"],
                             max_position_embeddings=max(2048, args.seq), tie_word_embeddings=False,
                             attn_implementation="sdpa")
        model = LlamaForCausalLM(config).to(device)
        ids = tokens.to(device)

        def loss_fn():
            return model(input_ids=ids, labels=ids).loss
    model.train()
    # exaone_ext: the trainer's optimizer (fused AdamW); transformers: a plain loop's default AdamW,
    # or with --side hf-fused the fused one too
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=args.side != "hf")

    def step():
        opt.zero_grad(set_to_none=True)
        with amp if amp is not None else _null():
            loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    rss0 = _rss_now_bytes() if device.type == "cpu" else 0
    step()  # warm-up; creates the optimizer state
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        # the model and inputs (resident before the first step) plus what stays from step to step,
        # counted exactly: the optimizer state and one gradient per parameter. (Not the resident set
        # after the first step, which holds whatever of that step's memory the allocator kept.)
        kept = sum(t.nbytes for st in opt.state.values() for t in st.values() if torch.is_tensor(t))
        kept += sum(p.nbytes for p in model.parameters() if p.requires_grad)
        base = rss0 + kept
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss_peak_bytes()) - base
    n = args.batch * args.seq
    return {"side": args.side, "tokens_per_s": n / min(times), "step_s": min(times), "peak_extra_mb": peak / 2**20,
            "loss": float(loss)}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=102400)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast on both sides")
    ap.add_argument("--side", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print(json.dumps(child(args)))
        return
    sides = ["exaone", "hf", "hf-fused"] + (["exaone-malloc"] if args.device == "cpu" else [])
    results = {side: [] for side in sides}
    for _ in range(args.rounds):
        for side in results:
            cmd = [sys.executable, __file__, "--side", side] + [
                f"--{k}={v}" for k, v in vars(args).items() if k not in ("side", "rounds", "bf16")] + (
                ["--bf16"] if args.bf16 else [])
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{side} side failed:\n{out.stderr[-3000:]}")
            results[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = {s: max(r, key=lambda x: x["tokens_per_s"]) for s, r in results.items()}
    peak = {s: min(x["peak_extra_mb"] for x in r) for s, r in results.items()}
    print(f"training step, {args.layers} layers, hidden {args.hidden}, GQA 8/2, head dim 64, vocab {args.vocab}, "
          f"batch {args.batch} x {args.seq} tokens, {args.device}{' bf16 autocast' if args.bf16 else ' fp32'}")
    for s, name in (("exaone", "exaone_ext trainer step"), ("exaone-malloc", "  the same, freed memory not kept"),
                    ("hf", "transformers LlamaForCausalLM (sdpa)"), ("hf-fused", "  the same with fused AdamW")):
        if s not in best:
            continue
        print(f"  {name:38s} {best[s]['tokens_per_s']:9.1f} tok/s  step {best[s]['step_s']:.2f} s  "
              f"peak +{peak[s]:.0f} MB  loss {best[s]['loss']:.3f}")
    print(f"  speed-up {best['exaone']['tokens_per_s'] / best['hf']['tokens_per_s']:.2f}x "
          f"({best['exaone']['tokens_per_s'] / best['hf-fused']['tokens_per_s']:.2f}x the fused-AdamW loop), "
          f"peak memory ratio {peak['exaone'] / max(peak['hf'], 1e-9):.2f}")


if __name__ == "__main__":
    main()
