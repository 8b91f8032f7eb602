"""Decode steps of the whole model against a long KV cache, with the CPU decode-attention kernels
and with the general attention kernel (`_C._set_attn_decode(False)`), alternated in one process.

    python benchmarks/bench_long_decode.py [--layers 30] [--context 8192] [--batch 1 4]

2.4B shape, random bf16 weights, the cache filled with random keys and values (no prefill needed):
what the decode kernel changes for a long conversation. A standalone script.
"""
import argparse
import time

import torch

from exaone_ext import _C
from exaone_ext.model import ExaoneConfig, ExaoneForCausalLM, KVCache


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args(argv)
    layers, ctx = args.layers, args.context
    config = ExaoneConfig.preset("2.4b", num_layers=layers)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = ExaoneForCausalLM(config)
    model = model.to(torch.bfloat16).to_empty(device="cpu")
    model.lm_head.weight = model.transformer.wte.weight
    model.reset_parameters(0.02)
    model.hugepage_weights()
    model.init_rope("cpu")
    model.eval()
    for batch in args.batch:
        cache = KVCache(config, batch, ctx + 64, torch.bfloat16, "cpu")
        for layer in cache.layers:
            layer.k.normal_()
            layer.v.normal_()
        cache.advance(ctx)
        ids = torch.randint(0, 1000, (batch, 1))
        res = {True: [], False: []}
        try:
            with torch.inference_mode():
                for on in (True, False, True, False):
                    _C._set_attn_decode(on)
                    for _ in range(args.steps):
                        t = time.perf_counter()
                        model(ids, kv_cache=cache, num_logits_to_keep=1)
                        res[on].append(time.perf_counter() - t)
                        cache.advance([-1] * batch)  # the same step again
        finally:
            _C._set_attn_decode(True)
        on, off = min(res[True]), min(res[False])
        print(f"2.4B shape, {layers} layers, batch {batch}, {ctx}-token cache: decode step {on * 1e3:.0f} ms with the "
              f"decode kernel, {off * 1e3:.0f} ms with the general kernel ({off / on:.2f}x); "
              f"{batch / on:.2f} against {batch / off:.2f} tokens/s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
