"""What generate() costs on top of the model: its decode tokens/s against a bare greedy loop over the
same model and KV cache (forward + argmax, nothing else), in one process, at batch 1 and batch B.

    python benchmarks/bench_generation.py                          # 2.4B shape, 4 layers, bf16, CPU
    python benchmarks/bench_generation.py --layers 30 --device cuda

The ratio generate / bare loop is the bookkeeping overhead (sampling, stop checks, detokenising,
host reads); it should stay close to 1. A standalone script (not part of the test run)."""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from exaone_ext.generation import GenerationConfig, generate
from exaone_ext.model import ExaoneConfig, ExaoneForCausalLM, KVCache
from exaone_ext.testing import write_tiny_tokenizer
from exaone_ext.tokenizer import ExaoneTokenizer


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def bare_loop(model, prompts: torch.Tensor, new_tokens: int) -> float:
    """Seconds for new_tokens - 1 greedy decode steps after a batched prefill (same cache layout)."""
    b, s = prompts.shape
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.config, b, s + new_tokens, dtype, prompts.device)
    nxt = model(prompts, kv_cache=cache, num_logits_to_keep=1)[:, -1].argmax(-1)
    sync(prompts.device)
    t = time.perf_counter()
    for _ in range(new_tokens - 1):
        nxt = model(nxt[:, None], kv_cache=cache, num_logits_to_keep=1)[:, -1].argmax(-1)
    nxt.tolist()
    sync(prompts.device)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="2.4b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens per row")
    ap.add_argument("--new", type=int, default=32, help="new tokens per row")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    with tempfile.TemporaryDirectory() as d:
        tok = ExaoneTokenizer.from_pretrained(write_tiny_tokenizer(d))
    config = ExaoneConfig.preset(args.preset, num_layers=args.layers)
    with torch.device(device):
        model = ExaoneForCausalLM(config).to(dtype)
    model.reset_parameters()
    print(f"{args.preset} shape, {args.layers} layers, {model.num_parameters / 1e6:.0f}M parameters, {dtype}, "
          f"{device}; prompt {args.prompt}, {args.new} new tokens per row")
    # No stop tokens, so every row runs its full length in both loops.
    cfg = GenerationConfig(max_new_tokens=args.new, stop_token_ids=[])
    g = torch.Generator().manual_seed(0)
    for batch in (1, args.batch):
        prompts = torch.randint(0, config.vocab_size, (batch, args.prompt), generator=g).to(device)
        bare = min(bare_loop(model, prompts, args.new) for _ in range(args.repeat))
        ours = min(generate(model, tok, prompts, cfg)[0].stats.decode_seconds for _ in range(args.repeat))
        steps = batch * (args.new - 1)
        print(f"batch {batch:2d}: bare loop {steps / bare:8.1f} tok/s   generate() {steps / ours:8.1f} tok/s   "
              f"generate / bare = {bare / ours:.3f}")


if __name__ == "__main__":
    main()
