"""Throughput and time to first token of `exaone-ext serve` at 1, 8 and 32 concurrent clients.

    python benchmarks/bench_server.py --layers 4 --levels 1,8,32 --max-tokens 32

The model has EXAONE 3.5 2.4B's shape (hidden 2560, 32 heads / 8 kv heads, MLP 7168, vocabulary
102400) with random weights; --layers cuts the depth (30 in the real model) so that a run fits a
small CPU. The tokenizer is a word-level one covering the whole vocabulary, so that every
generated id has text and arrives as its own SSE chunk. The server is uvicorn on 127.0.0.1 in a
thread of this process; the clients are httpx streams in the same process.

At each level N clients each send streaming completions back to back (a prompt of
--prompt-tokens random ids, --max-tokens generated, ignore_eos), a closed loop of N requests in
flight. Client i starts i/N of one request's duration after the first, so that arrivals are
spread out as they are in steady serving rather than all landing in the same step. The level is
measured over a window of --seconds that opens when the last client has sent its first request
(from then on N requests are always in flight: a client sends its next request as soon as one
ends, until the window closes) and closes --seconds later. Reported: the generated tokens that
reached the clients inside the window per second (every SSE chunk is timestamped on arrival;
each request's chunks are checked against its usage count; a generated special id has no
text), requests completed, and the median /
90th-percentile time to first token (request sent -> first token received) of the requests sent
inside the window. Targets: tokens/s at 8 clients >= 4x that at 1; median TTFT at 8 <= 2x that
at 1.

--engine also drives the Engine directly (no HTTP) at each level: N rows decoding together
(median ms per decode step, tokens/s, x one row), and a step in which one newcomer is admitted
while N - 1 rows decode (one pass, its prompt packed after the rows' next tokens; with --no-mix a
prefill pass of its own, then the decode pass): where the server's time goes.

--long-prompt N drives the Engine with --long-rows rows decoding when a prompt of N tokens
arrives, once with its prefill in chunks of --prefill-chunk-size tokens, one per decode step
(the default), once with mixing off (the whole prompt prefilled before the next decode pass):
the longest wait between two tokens of a running row, and the long request's time to its first
token.

    python benchmarks/bench_server.py --layers 4 --levels 1 --seconds 2 --long-prompt 4096
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import sys
import threading
import time


def build_model(layers: int, dtype, device):
    import torch

    from exaone_ext import ExaoneConfig, ExaoneForCausalLM

    # eos at 3, where the benchmark's tokenizer puts [|endofturn|]
    config = ExaoneConfig.preset("2.4b", num_layers=layers, bos_token_id=1, eos_token_id=3, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = ExaoneForCausalLM(config)
    model = model.to(dtype).to_empty(device=device)  # storage allocated once, in the final dtype
    if config.tie_word_embeddings:  # to_empty gives every parameter its own storage: tie the head again
        model.lm_head.weight = model.transformer.wte.weight
    model.reset_parameters(0.02)
    if device.type == "cpu":
        model.hugepage_weights()  # as from_pretrained does for CPU models
    model.init_rope(device)
    return model.eval()


def build_tokenizer(vocab_size: int):
    """Word-level: id i is the word "w<i>", the specials at 0-3; decodes as words joined by spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from exaone_ext import ExaoneTokenizer

    specials = ["[PAD]", "[BOS]", "[UNK]", "[|endofturn|]"]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(specials)
    return ExaoneTokenizer(tok)


class ServerThread:
    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


async def one_request(http, prompt, max_tokens) -> tuple[float, float, list[tuple[float, int]]]:
    """(time sent, time to first token, [(arrival time, tokens)] per chunk) of one streamed completion."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, arrivals, usage = None, [], None
    async with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"status {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                if ttft is None:
                    ttft = now - start
                arrivals.append((now, len(chunk["choices"][0]["text"].split())))  # word-level: a word a token
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
    # A generated special id (0-3: the random model draws one about once in 25600 tokens) is
    # skipped by the text stream, so a request may show a word or two fewer than its usage; never more.
    words = sum(n for _, n in arrivals)
    if usage is None or not 0 <= usage - words <= 2:
        raise RuntimeError(f"the chunks held {words} tokens, the usage says {usage}")
    return start, ttft, arrivals


async def level(url, clients, seconds, prompt_tokens, max_tokens, request_s, rng):
    """N clients in a closed loop; tokens/s and TTFT over the window in which all N are in flight."""
    import httpx

    done = []  # (sent, ttft, arrivals) of every request
    t0 = time.perf_counter()
    window_start = t0 + (clients - 1) * request_s / clients  # the last client's first request
    window_end = window_start + seconds

    async def client(i):
        await asyncio.sleep(max(0.0, t0 + i * request_s / clients - time.perf_counter()))
        while True:
            prompt = [rng.randrange(4, 1000) for _ in range(prompt_tokens)]
            done.append(await one_request(http, prompt, max_tokens))
            if time.perf_counter() >= window_end:
                break

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as http:
        await asyncio.gather(*(client(i) for i in range(clients)))
    tokens = sum(n for _, _, arrivals in done for t, n in arrivals if window_start <= t < window_end)
    completed = sum(1 for _, _, arrivals in done if window_start <= arrivals[-1][0] < window_end)
    ttfts = sorted(ttft for sent, ttft, _ in done if window_start <= sent < window_end)
    if not ttfts:
        raise RuntimeError(f"no request was sent inside the {seconds} s window: lengthen --seconds")
    return {"clients": clients, "requests": completed, "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "ttft_median_s": statistics.median(ttfts),
            "ttft_p90_s": ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))]}


def _level_row(r: dict, base: dict) -> str:
    """One level's line of the table; ratios against `base` (the one-client level)."""
    return (f"{r['clients']:>7} {r['requests']:>9g} {r['tokens']:>7g} {r['seconds']:>7.1f}s "
            f"{r['tokens_per_s']:>8.2f} {r['tokens_per_s'] / base['tokens_per_s']:>6.2f} "
            f"{r['ttft_median_s'] * 1e3:>7.0f}ms {r['ttft_p90_s'] * 1e3:>7.0f}ms "
            f"{r['ttft_median_s'] / base['ttft_median_s']:>8.2f}")


async def warm_up(url, prompt_tokens, max_tokens, rng) -> float:
    """One request alone, twice; the second one's duration (spaces the clients' starts)."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=3600) as http:
        for _ in range(2):
            start = time.perf_counter()
            await one_request(http, [rng.randrange(4, 1000) for _ in range(prompt_tokens)], max_tokens)
    return time.perf_counter() - start


def engine_levels(model, tokenizer, levels, max_batch, max_seq, prompt_tokens, steps, rng, mix) -> list[dict]:
    """Per level N: median seconds of a decode step of N rows, and of a step admitting one
    newcomer beside N - 1 decoding rows."""
    from exaone_ext.generation import GenerationConfig
    from exaone_ext.generation.engine import Engine

    config = GenerationConfig(max_new_tokens=max_seq - prompt_tokens - 1, stop_token_ids=[])

    def prompt():
        return [rng.randrange(4, 1000) for _ in range(prompt_tokens)]

    out = []
    for n in levels:
        engine = Engine(model, tokenizer, max_batch=max_batch, max_seq_len=max_seq)
        engine.mix_prefill = mix
        for _ in range(n - 1):
            engine.add(prompt(), config)
        if n > 1:
            engine.step()  # the n - 1 rows admitted together
        engine.add(prompt(), config)
        t = time.perf_counter()
        engine.step()  # one newcomer admitted beside n - 1 decoding rows
        admit = time.perf_counter() - t
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t)
        decode = statistics.median(times)
        out.append({"rows": n, "decode_step_s": decode, "tokens_per_s": n / decode, "admit_step_s": admit})
    return out


def long_prompt_gaps(model, tokenizer, rows, long_tokens, chunk, mix, rng) -> dict:
    """rows requests decoding, then one prompt of long_tokens tokens arrives: every step timed until
    it has its first token, then a few plain decode steps."""
    from exaone_ext.generation import GenerationConfig
    from exaone_ext.generation.engine import Engine

    max_seq = long_tokens + 64
    engine = Engine(model, tokenizer, max_batch=rows + 1, max_seq_len=max_seq, prefill_chunk_size=chunk)
    engine.mix_prefill = mix
    config = GenerationConfig(max_new_tokens=max_seq, stop_token_ids=[])
    runners = [engine.add([rng.randrange(4, 1000) for _ in range(16)], config) for _ in range(rows)]
    for _ in range(3):
        engine.step()
    long = engine.add([rng.randrange(4, 1000) for _ in range(long_tokens)], GenerationConfig(max_new_tokens=8))
    gaps, start = [], time.perf_counter()
    last = start
    while not long.tokens:
        engine.step()
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    ttft = last - start
    plain = []
    for _ in range(4):
        t = time.perf_counter()
        engine.step()
        plain.append(time.perf_counter() - t)
    assert all(len(r.tokens) > 3 for r in runners)
    return {"mix": mix, "steps": len(gaps), "max_gap_s": max(gaps), "ttft_s": ttft,
            "decode_step_s": statistics.median(plain)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=30, help="decoder layers (2.4B has 30)")
    p.add_argument("--levels", default="1,8,32", help="concurrent clients, comma-separated")
    p.add_argument("--seconds", type=float, default=4.0,
                   help="length of each level's window, in which all its clients have a request in flight")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the levels in turn this many times; figures are the medians over the rounds")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=None, help="engine rows (default: the largest level)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--engine", action="store_true", help="also time the Engine directly at each level (no HTTP)")
    p.add_argument("--no-mix", action="store_true",
                   help="prefill newcomers in a pass of their own before the decode pass (Engine.mix_prefill off)")
    p.add_argument("--long-prompt", type=int, default=0, metavar="N",
                   help="also time a prompt of N tokens arriving while --long-rows rows decode (see above)")
    p.add_argument("--long-rows", type=int, default=4)
    p.add_argument("--prefill-chunk-size", type=int, default=512,
                   help="prompt tokens per pass for --long-prompt (default 512)")
    args = p.parse_args(argv)

    import torch

    from exaone_ext.generation.engine import Engine
    from exaone_ext.serve import create_app

    levels = [int(x) for x in args.levels.split(",")]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t0 = time.perf_counter()
    model = build_model(args.layers, getattr(torch, args.dtype), device)
    tokenizer = build_tokenizer(model.config.vocab_size)
    max_batch = args.max_batch or max(levels)
    max_seq = args.prompt_tokens + args.max_tokens + 8
    engine = Engine(model, tokenizer, max_batch=max_batch, max_seq_len=max_seq)
    engine.mix_prefill = not args.no_mix
    server = ServerThread(create_app(engine, model_name="bench", max_waiting=4 * max(levels)))
    print(f"2.4B shape, {args.layers} of 30 layers, {args.dtype} on {device}, {torch.get_num_threads()} threads, "
          f"max_batch {max_batch}, newcomers {'in a prefill pass of their own' if args.no_mix else 'in the decode pass'}; prompt {args.prompt_tokens} tokens, {args.max_tokens} generated per request "
          f"(set-up {time.perf_counter() - t0:.1f}s)", file=sys.stderr)
    rng = random.Random(0)
    try:
        # warm-up, and the length of one request alone (spaces the clients' starts)
        request_s = asyncio.run(warm_up(server.url, args.prompt_tokens, args.max_tokens, rng))
        if not args.json:
            print(f"{'clients':>7} {'completed':>9} {'tokens':>7} {'window':>8} {'tok/s':>8} {'x1':>6} "
                  f"{'TTFT med':>9} {'TTFT p90':>9} {'TTFT x1':>8}", flush=True)
        rounds = []  # the levels in turn, --rounds times: slow spells of the machine hit every level
        for k in range(args.rounds):
            rounds.append([])
            for n in levels:  # each level printed as it finishes
                r = asyncio.run(level(server.url, n, args.seconds, args.prompt_tokens, args.max_tokens, request_s,
                                      rng))
                rounds[-1].append(r)
                base = rounds[-1][0]
                if not args.json:
                    print(_level_row(r, base), flush=True)
        # per level, the median over the rounds of each figure
        results = [{key: n if key == "clients" else statistics.median(rd[i][key] for rd in rounds)
                    for key in rounds[0][i]} for i, n in enumerate(levels)]
        if args.rounds > 1 and not args.json:
            print(f"median of {args.rounds} rounds:")
            for r in results:
                print(_level_row(r, results[0]), flush=True)
    finally:
        server.stop()
    engine_results = []
    if args.engine:
        steps = max(4, min(16, args.max_tokens - 2))
        engine_results = engine_levels(model, tokenizer, [min(n, max_batch) for n in levels], max_batch, max_seq,
                                       args.prompt_tokens, steps, rng, not args.no_mix)
        if not args.json:
            print(f"\nengine alone: {'rows':>4} {'decode step':>12} {'tok/s':>8} {'x1':>6} {'admit step':>11}")
            for e in engine_results:
                print(f"{'':>13} {e['rows']:>4} {e['decode_step_s'] * 1e3:>10.1f}ms {e['tokens_per_s']:>8.2f} "
                      f"{e['tokens_per_s'] / engine_results[0]['tokens_per_s']:>6.2f} {e['admit_step_s'] * 1e3:>9.1f}ms",
                      flush=True)
    long_results = []
    if args.long_prompt:
        long_results = [long_prompt_gaps(model, tokenizer, args.long_rows, args.long_prompt, args.prefill_chunk_size,
                                         mix, rng) for mix in (True, False)]
        if not args.json:
            print(f"\na {args.long_prompt}-token prompt arriving while {args.long_rows} rows decode "
                  f"(chunks of {args.prefill_chunk_size}):")
            print(f"{'':>2}{'prefill':<34} {'steps':>5} {'longest gap':>12} {'TTFT':>9} {'decode step':>12}")
            for r in long_results:
                how = "one chunk per decode pass" if r["mix"] else "whole, before the decode pass"
                print(f"{'':>2}{how:<34} {r['steps']:>5} {r['max_gap_s'] * 1e3:>10.0f}ms {r['ttft_s']:>8.2f}s "
                      f"{r['decode_step_s'] * 1e3:>10.0f}ms", flush=True)
    if args.json:
        out = {"server": results}
        if args.engine:
            out["engine"] = engine_results
        if long_results:
            out["long_prompt"] = long_results
        print(json.dumps(out if len(out) > 1 else results, indent=2))
        return 0
    by = {r["clients"]: r for r in results}
    if 1 in by and 8 in by:
        tput = by[8]["tokens_per_s"] / by[1]["tokens_per_s"]
        ttft = by[8]["ttft_median_s"] / by[1]["ttft_median_s"]
        print(f"8 clients: {tput:.2f}x the tokens/s of one (target >= 4x: {'met' if tput >= 4 else 'NOT met'}); "
              f"median TTFT {ttft:.2f}x (target <= 2x: {'met' if ttft <= 2 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
