"""Batch-1 decode and prefill throughput of ExaoneForCausalLM against Hugging Face transformers'
LlamaForCausalLM running on the very same weight tensors (shared, not copied), in one process.

    python benchmarks/bench_model.py                       # 2.4B shape, all 30 layers, bf16
    python benchmarks/bench_model.py --layers 4 --prefill 512 --decode 16   # a quick look
    python benchmarks/bench_model.py --quant int8 int4 --no-hf              # also quantized decode

Reports decode tokens/s and the weight bytes it reads per second as a fraction of the machine's read
bandwidth (summing a 1 GiB tensor, sampled before and after every decode run: each run is held
against the higher of its two samples, and the median over runs is reported), prefill tokens/s,
batched decode, batched prefill (packed against one forward per prompt), and peak memory against
weights + KV cache. With --quant, the same bf16 model quantized (a copy per format: every block
projection, and the head in --quant-head's format; the tied embedding then looks up the quantized
head's rows) decodes too, its bytes read counted as stored (quantized weights, scales, zero points,
the head and norms; a float embedding only while it is the head), and prefills (also against bf16
prefills alternated with its own, reported as a speed ratio). On a CPU each decode also runs
alternated with its Python blocks (cpu_fused_layers off), reported as the speed ratio of the one-call
path (ops.decode_layers). On a GPU (or with
--engine) decoding also goes through the Engine, as generate() and the server run it: on a GPU with
its decode step replayed as a CUDA graph, and without. A standalone script (not part of the test run)."""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import time

import torch

from exaone_ext.model import ExaoneConfig, ExaoneForCausalLM, KVCache, exaone_to_llama_name


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_time(fn, device, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def read_bandwidth(device, gib: float = 1.0) -> float:
    """Bytes/s of summing a `gib` GiB float32 tensor (best of 5)."""
    x = torch.ones(int(gib * 2**30) // 4, device=device)
    x.sum()
    t = best_time(lambda: x.sum().item(), device, 5)
    return x.nbytes / t


# ---- peak memory ----
def _rss_peak_reset():
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak resident set size (VmHWM)


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


class Memory:
    def __init__(self, device):
        self.device = device

    def current(self) -> int:
        return torch.cuda.memory_allocated() if self.device.type == "cuda" else _status("VmRSS")

    def reset_peak(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            _rss_peak_reset()

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated() if self.device.type == "cuda" else _status("VmHWM")


def hf_model_sharing(model: ExaoneForCausalLM):
    """A transformers LlamaForCausalLM whose parameters are our model's tensors (no copy)."""
    import transformers
    cfg = transformers.LlamaConfig(**model.config.to_llama_dict())
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(cfg)
    ours = dict(model.named_parameters())
    for name, _ in list(hf.named_parameters()):
        src = "transformer.wte.weight" if name == "lm_head.weight" and model.config.tie_word_embeddings else None
        tensor = ours[src] if src else ours[next(k for k in ours if exaone_to_llama_name(k) == name)]
        mod, _, attr = name.rpartition(".")
        hf.get_submodule(mod)._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=False)
    if model.config.tie_word_embeddings:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    dev = model.transformer.wte.weight.device
    rotary = hf.model.rotary_emb  # its buffers were built on meta: rebuild them
    fresh = type(rotary)(cfg).to(dev)
    hf.model.rotary_emb = fresh
    return hf.eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="2.4b")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the preset (stated in the output)")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens before decoding")
    ap.add_argument("--decode", type=int, default=32, help="tokens decoded and timed")
    ap.add_argument("--prefill", type=int, default=2048, help="tokens in the timed prefill")
    ap.add_argument("--batch", type=int, default=8, help="batch of the batched-decode figure (0: skip)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--quant", nargs="*", default=[], choices=["int8", "int4"],
                    help="also decode (and prefill) with the block projections quantized to these formats")
    ap.add_argument("--quant-head", nargs="+", default=["int8"], choices=["int8", "int4", "float"],
                    help="with --quant: the head's format (several: one row each, same run; default int8)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument("--engine", action="store_true",
                    help="also time decoding through the Engine on a CPU (on a GPU it always is: with and "
                         "without CUDA graphs)")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16
    torch.manual_seed(0)
    overrides = {"num_layers": args.layers} if args.layers else {}
    config = ExaoneConfig.preset(args.preset, **overrides)
    mem = Memory(device)

    out: dict = {"preset": args.preset, "num_layers": config.num_layers, "dtype": "bfloat16",
                 "device": str(device), "threads": torch.get_num_threads()}
    bw_samples = []

    def bracketed(run, read_bytes=None):
        """Runs `run` (returns (seconds, extra)) between two bandwidth samples, --repeat times.
        Returns the fastest run's (seconds, extra) and, per run, its weight-read rate over the
        higher of its two samples: this machine's memory rate moves 1.5-2x from one minute to the
        next, so each run is held against the rate measured around it, never flattered by a slow
        moment (the higher sample), and the median of the runs is reported."""
        runs, fractions = [], []
        before = read_bandwidth(device)
        bw_samples.append(before)
        for _ in range(args.repeat):
            dt, extra = run()
            after = read_bandwidth(device)
            bw_samples.append(after)
            runs.append((dt, extra))
            fractions.append(args.decode * (read_bytes or read_per_token) / dt / max(before, after))
            before = after
        fractions.sort()
        mid = len(fractions) // 2
        median = fractions[mid] if len(fractions) % 2 else (fractions[mid - 1] + fractions[mid]) / 2
        return min(runs, key=lambda r: r[0]), median, fractions
    print(f"{args.preset} shape, {config.num_layers} layers ({config.num_parameters / 1e9:.3f} B params), bf16, "
          f"{device}, {torch.get_num_threads()} threads")

    base = mem.current()
    with torch.device("meta"):
        model = ExaoneForCausalLM(config)
    model = model.to(dtype).to_empty(device=device)  # bf16 storage allocated once
    if config.tie_word_embeddings:  # to_empty gives every parameter its own storage: tie the head again
        model.lm_head.weight = model.transformer.wte.weight
    model.reset_parameters(0.02)
    model.hugepage_weights()  # as from_pretrained does for CPU models
    model.init_rope(device)
    model.eval()
    weight_bytes = sum(p.nbytes for p in model.parameters())
    # one decode step reads every matrix once; the embedding only by rows unless it is the tied head
    read_per_token = weight_bytes - (0 if config.tie_word_embeddings else model.transformer.wte.weight.nbytes)
    V = config.vocab_size
    prompt = torch.randint(0, V, (1, args.prompt), device=device)
    max_len = args.prompt + args.decode + 1

    def ours_decode(use_kernels, batch=1, model=model):
        model.use_kernels = use_kernels
        cache = KVCache(config, batch, max_len, dtype, device)
        p = prompt.expand(batch, -1)
        logits = model(p, kv_cache=cache, num_logits_to_keep=1)
        tok = logits[:, -1].argmax(-1, keepdim=True)
        sync(device)
        t = time.perf_counter()
        for _ in range(args.decode):
            tok = model(tok, kv_cache=cache)[:, -1].argmax(-1, keepdim=True)  # [batch, 1]
        sync(device)
        return time.perf_counter() - t, cache

    def one_call_vs_blocks(model):
        """On a CPU: decode through the one-call path (ops.decode_layers) against the Python blocks
        (cpu_fused_layers False), alternated three times; the speed ratio of the fastest of each."""
        t_one, t_blocks = [], []
        for _ in range(3):
            t_one.append(ours_decode(True, model=model)[0])
            model.cpu_fused_layers = False
            try:
                t_blocks.append(ours_decode(True, model=model)[0])
            finally:
                model.cpu_fused_layers = True
        return min(t_blocks) / min(t_one)

    def ours_prefill(use_kernels, model=model):
        model.use_kernels = use_kernels
        ids = torch.randint(0, V, (1, args.prefill), device=device)
        return best_time(lambda: model(ids, num_logits_to_keep=1), device, args.repeat)

    rows = {}
    with torch.inference_mode():
        ours_decode(True)  # warm-up
        mem.reset_peak()
        _, cache = ours_decode(True)  # the peak memory of a decode run (the timed runs sample bandwidth in between)
        decode_peak = mem.peak()
        kv_bytes = cache.nbytes
        (dt, _), frac, fracs = bracketed(lambda: ours_decode(True))
        rows["ours (kernels)"] = {"decode_tok_s": args.decode / dt, "decode_fraction_of_bandwidth": frac,
                                  "decode_fraction_per_run": fracs}
        if device.type == "cpu":
            rows["ours (kernels)"]["one_call_vs_python_blocks"] = one_call_vs_blocks(model)
        (dt_ref, _), frac, fracs = bracketed(lambda: ours_decode(False))
        rows["ours (reference ops)"] = {"decode_tok_s": args.decode / dt_ref, "decode_fraction_of_bandwidth": frac,
                                        "decode_fraction_per_run": fracs}
        if args.prefill:
            mem.reset_peak()
            rows["ours (kernels)"]["prefill_tok_s"] = args.prefill / ours_prefill(True)
            prefill_peak = mem.peak()
            rows["ours (reference ops)"]["prefill_tok_s"] = args.prefill / ours_prefill(False)
        if args.batch > 1:
            dtb, _ = ours_decode(True, args.batch)
            out["batched_decode"] = {"batch": args.batch, "tok_s": args.batch * args.decode / dtb,
                                     "speedup_vs_batch1": (args.batch * args.decode / dtb) / rows["ours (kernels)"]["decode_tok_s"]}
            # prefill of `batch` prompts (lengths around --prompt) into their cache rows: one packed
            # forward (what generate() does) against one forward per prompt
            model.use_kernels = True
            docs = [torch.randint(0, V, (args.prompt + i,), device=device) for i in range(args.batch)]
            cu = torch.tensor([0] + [sum(len(d) for d in docs[:i + 1]) for i in range(args.batch)],
                              dtype=torch.int32, device=device)

            def prefill_rows():
                c = KVCache(config, args.batch, max_len + args.batch, dtype, device)
                for b, d in enumerate(docs):
                    model(d[None], kv_cache=c.row(b), num_logits_to_keep=1)

            def prefill_packed():
                c = KVCache(config, args.batch, max_len + args.batch, dtype, device)
                model(torch.cat(docs), cu_seqlens=cu, kv_cache=c, num_logits_to_keep=1)

            prefill_rows(), prefill_packed()
            t_rows, t_packed = best_time(prefill_rows, device, args.repeat), best_time(prefill_packed, device, args.repeat)
            out["batched_prefill"] = {"batch": args.batch, "tokens": int(cu[-1]), "one_by_one_s": t_rows,
                                      "packed_s": t_packed, "speedup": t_rows / t_packed}

        if device.type == "cuda" or args.engine:
            # generation through the Engine (what generate() and the server run): on a GPU its
            # decode steps replay CUDA graphs; the same engine without them beside it
            from bench_server import build_tokenizer  # word-level over the whole vocabulary

            from exaone_ext.generation import Engine, GenerationConfig
            model.use_kernels = True
            tokenizer = build_tokenizer(V)
            ids = prompt[0].tolist()
            # the first step prefills and decodes once; the timed steps decode args.decode tokens
            gconf = GenerationConfig(max_new_tokens=args.decode + 2, stop_token_ids=[])
            for graphs in ([True, False] if device.type == "cuda" else [False]):
                engine = Engine(model, tokenizer, max_batch=1, max_seq_len=max_len + 2, cuda_graphs=graphs)

                def engine_decode(engine=engine):
                    engine.add(ids, gconf)
                    engine.step()
                    sync(device)
                    t = time.perf_counter()
                    while engine.has_work:
                        engine.step()
                    sync(device)
                    return time.perf_counter() - t, None

                engine_decode()  # warm-up (on a GPU the graph is captured here)
                (dte, _), frac, fracs = bracketed(engine_decode)
                name = "ours engine" + (" (CUDA graphs)" if graphs else " (eager)" if device.type == "cuda" else "")
                rows[name] = {"decode_tok_s": args.decode / dte, "decode_fraction_of_bandwidth": frac,
                              "decode_fraction_per_run": fracs}
                if graphs:
                    rows[name]["graph_replays"] = engine._graphs.replays if engine._graphs else 0
                    rows[name]["graphs_disabled"] = engine._graphs.disabled if engine._graphs else "no graphs"

        for fmt, head in [(f, h) for f in args.quant for h in args.quant_head]:
            qmodel = copy.deepcopy(model).quantize(fmt, head=None if head == "float" else head)
            name = f"ours {fmt}" + (f" head {head}" if len(args.quant_head) > 1 else "")
            qmodel.eval()
            # what a step reads: parameters (norms, a float head) and the quantized buffers (the head's
            # too), the embedding only while it is the head, not the RoPE tables
            stored = {id(t): t for t in qmodel.parameters()}
            stored.update({id(b): b for n, b in qmodel.named_buffers() if not n.rpartition(".")[2].startswith("rope")})
            embed = getattr(qmodel.transformer.wte, "weight", None)   # None: a lookup into the quantized head
            head_is_embed = embed is not None and getattr(qmodel.lm_head, "weight", None) is embed
            q_read = sum(t.nbytes for t in stored.values() if head_is_embed or t is not embed)
            ours_decode(True, model=qmodel)  # warm-up
            (dtq, _), frac, fracs = bracketed(lambda: ours_decode(True, model=qmodel), q_read)
            rows[name] = {"decode_tok_s": args.decode / dtq, "decode_fraction_of_bandwidth": frac,
                          "decode_fraction_per_run": fracs, "read_per_token": q_read, "head": head}
            if device.type == "cpu":
                rows[name]["one_call_vs_python_blocks"] = one_call_vs_blocks(qmodel)
            if args.prefill:
                # against bf16 prefills alternated with these, so that both see the machine in one state
                tq, tb = [], []
                for _ in range(4):   # two pairs left ratios 0.76-1.05x on a VM whose memory rate swings 2x
                    tq.append(ours_prefill(True, model=qmodel))
                    tb.append(ours_prefill(True))
                rows[name]["prefill_tok_s"] = args.prefill / min(tq)
                rows[name]["prefill_vs_bf16_alternated"] = min(tb) / min(tq)
            del qmodel

        if not args.no_hf:
            hf = hf_model_sharing(model)
            from transformers import DynamicCache

            def hf_decode():
                # the greedy loop generate() runs, without its per-step bookkeeping
                pkv = DynamicCache(config=hf.config)
                logits = hf(prompt, past_key_values=pkv, use_cache=True, logits_to_keep=1).logits
                tok = logits[:, -1].argmax(-1, keepdim=True)
                sync(device)
                t = time.perf_counter()
                for _ in range(args.decode):
                    logits = hf(tok, past_key_values=pkv, use_cache=True, logits_to_keep=1).logits
                    tok = logits[:, -1].argmax(-1, keepdim=True)
                sync(device)
                return time.perf_counter() - t

            hf_decode()  # warm-up
            (dt_hf, _), frac, fracs = bracketed(lambda: (hf_decode(), None))
            rows["transformers"] = {"decode_tok_s": args.decode / dt_hf, "decode_fraction_of_bandwidth": frac,
                                    "decode_fraction_per_run": fracs}
            gen = lambda n: hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                        min_new_tokens=n, do_sample=False, pad_token_id=0)
            t_gen = best_time(lambda: gen(args.decode), device, args.repeat)
            out["transformers_generate_s"] = {"prompt": args.prompt, "new_tokens": args.decode, "seconds": t_gen}
            if args.prefill:
                pids = torch.randint(0, V, (1, args.prefill), device=device)
                t = best_time(lambda: hf(pids, use_cache=False, logits_to_keep=1), device, args.repeat)
                rows["transformers"]["prefill_tok_s"] = args.prefill / t

    out["read_bandwidth_samples_GBps"] = [b / 1e9 for b in bw_samples]
    print(f"read bandwidth samples (sum of 1 GiB, around each decode run): "
          f"{' / '.join(f'{b / 1e9:.1f}' for b in bw_samples)} GB/s")
    for name, r in rows.items():
        r["decode_weight_GBps"] = r["decode_tok_s"] * r.get("read_per_token", read_per_token) / 1e9
    out["rows"] = rows
    out["weight_bytes"] = weight_bytes
    out["kv_cache_bytes"] = kv_bytes
    out["decode_peak_over_weights_plus_kv"] = (decode_peak - base) / (weight_bytes + kv_bytes)
    out["decode_peak_bytes"] = decode_peak - base
    if args.prefill:
        out["prefill_peak_over_weights"] = (prefill_peak - base) / weight_bytes

    print(f"{'':24s}{'decode tok/s':>14s}{'weights GB/s':>14s}{'of bandwidth':>14s}{'prefill tok/s':>15s}")
    for name, r in rows.items():
        print(f"{name:24s}{r['decode_tok_s']:14.2f}{r['decode_weight_GBps']:14.2f}"
              f"{r['decode_fraction_of_bandwidth']:14.1%}{r.get('prefill_tok_s', float('nan')):15.1f}")
    print("of bandwidth: weight bytes read per second over the higher of the two bandwidth samples taken around "
          "each decode run, median of the runs; per run: "
          + "; ".join(f"{name} {' '.join(f'{f:.1%}' for f in r['decode_fraction_per_run'])}" for name, r in rows.items()))
    alternated = {name: r["prefill_vs_bf16_alternated"] for name, r in rows.items() if "prefill_vs_bf16_alternated" in r}
    if alternated:
        print("prefill speed against bf16, alternated with bf16 prefills: "
              + ", ".join(f"{name.removeprefix('ours ')} {x:.2f}x" for name, x in alternated.items()))
    one_call = {name: r["one_call_vs_python_blocks"] for name, r in rows.items() if "one_call_vs_python_blocks" in r}
    if one_call:
        print("decode with the layers in one call (ops.decode_layers) against the Python blocks, alternated: "
              + ", ".join(f"{name.removeprefix('ours ')} {x:.2f}x" for name, x in one_call.items()))
    if "transformers" in rows:
        hf_r, ours_r = rows["transformers"], rows["ours (kernels)"]
        print(f"ours / transformers: decode {ours_r['decode_tok_s'] / hf_r['decode_tok_s']:.2f}x"
              + (f", prefill {ours_r['prefill_tok_s'] / hf_r['prefill_tok_s']:.2f}x (prompt {args.prefill})"
                 if args.prefill else ""))
    if "transformers_generate_s" in out:
        g = out["transformers_generate_s"]
        print(f"transformers generate(): {g['seconds']:.2f} s for a {g['prompt']}-token prompt + {g['new_tokens']} tokens")
    if "batched_decode" in out:
        b = out["batched_decode"]
        print(f"batched decode (batch {b['batch']}): {b['tok_s']:.1f} tok/s, {b['speedup_vs_batch1']:.2f}x batch 1")
    if "batched_prefill" in out:
        b = out["batched_prefill"]
        print(f"batched prefill ({b['batch']} prompts, {b['tokens']} tokens): packed {b['packed_s']:.2f} s, one by one "
              f"{b['one_by_one_s']:.2f} s: {b['speedup']:.2f}x")
    print(f"memory: weights {weight_bytes / 1e9:.2f} GB, KV cache {kv_bytes / 1e6:.1f} MB; decode peak above the "
          f"start {out['decode_peak_bytes'] / 1e9:.2f} GB = {out['decode_peak_over_weights_plus_kv']:.2f}x "
          f"weights+KV" + (f"; prefill peak {out['prefill_peak_over_weights']:.2f}x weights" if args.prefill else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
