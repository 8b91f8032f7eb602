"""The step-function Engine with the real tiny model and tokenizer: requests join and leave a
running decode loop (each result equal to its solo generate run), cancellation frees the row,
per-request sampling settings in one batch, events that reassemble the text, bad input."""
from __future__ import annotations

import pytest
import torch

from exaone_ext.generation import Engine, Event, GenerationConfig, Request, generate
from exaone_ext.model import ExaoneForCausalLM
from exaone_ext.tokenizer import ExaoneTokenizer

PROMPTS = ["Hello", "The capital of Korea is", "안녕하세요. 저는", "Large language models predict the next token",
           "Seoul is"]


@pytest.fixture(scope="module")
def tok(ckpt):
    return ExaoneTokenizer.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def model(ckpt):
    return ExaoneForCausalLM.from_pretrained(ckpt)


def greedy(n: int) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n, stop_token_ids=[])


def run(engine: Engine, events: list[Event] | None = None, max_steps: int = 1000) -> None:
    for _ in range(max_steps):
        if not engine.has_work:
            return
        got = engine.step()
        if events is not None:
            events.extend(got)
    raise AssertionError("the engine did not finish")


def decode_batches(model, monkeypatch) -> list[int]:
    """Records the batch size of every decode forward (one token per row) the model runs."""
    sizes = []
    real = type(model).forward

    def spy(self, input_ids, *args, **kw):
        if kw.get("cu_seqlens") is None and input_ids.dim() == 2 and input_ids.shape[1] == 1:
            sizes.append(input_ids.shape[0])
        return real(self, input_ids, *args, **kw)

    monkeypatch.setattr(type(model), "forward", spy)
    return sizes


def test_requests_join_and_leave_a_running_loop(model, tok, monkeypatch):
    budgets = [5, 12, 6, 9, 4]
    solo = [generate(model, tok, p, greedy(n)) for p, n in zip(PROMPTS, budgets)]
    sizes = decode_batches(model, monkeypatch)
    engine = Engine(model, tok, max_batch=3)
    reqs = [engine.add(PROMPTS[0], greedy(budgets[0])), engine.add(PROMPTS[1], greedy(budgets[1]))]
    engine.step()
    engine.step()
    assert engine.num_active == 2 and len(reqs[1].tokens) == 3
    # three more arrive while the first two are decoding: one takes the free row, two wait
    reqs += [engine.add(p, greedy(n)) for p, n in zip(PROMPTS[2:], budgets[2:])]
    assert engine.num_waiting == 3
    engine.step()
    assert engine.num_active == 3 and engine.num_waiting == 2
    waited = False
    while engine.has_work:
        waited |= engine.num_waiting > 0 and engine.num_active == 3
        engine.step()
    assert waited
    for r, s in zip(reqs, solo):
        assert r.done and r.stop_reason == "length"
        assert r.tokens == s.tokens and r.text == s.text
    # the decode batch grew and shrank with the active rows, never past max_batch
    assert max(sizes) == 3 and 1 in sizes and sizes != sorted(sizes)


def test_cancel_frees_the_row(model, tok):
    engine = Engine(model, tok, max_batch=1)
    a = engine.add(PROMPTS[3], greedy(50))
    b = engine.add(PROMPTS[1], greedy(5))
    c = engine.add(PROMPTS[2], greedy(5))
    engine.step()
    engine.step()
    assert engine.num_active == 1 and engine.num_waiting == 2 and len(a.tokens) == 3
    engine.cancel(a)
    engine.cancel(c)          # still waiting: never admitted
    events = engine.step()
    finished = {e.request.id: e for e in events if e.finished}
    assert a.stop_reason == "cancelled" and a.done and a.id in finished
    assert c.stop_reason == "cancelled" and c.tokens == [] and c.id in finished
    assert engine.num_active == 1 and engine.num_waiting == 0 and len(b.tokens) >= 1  # b took a's row
    run(engine)
    assert b.tokens == generate(model, tok, PROMPTS[1], greedy(5)).tokens
    engine.cancel(b)          # done already: nothing happens
    assert b.stop_reason == "length" and not engine.has_work
    with pytest.raises(ValueError, match="not one of this engine's"):
        engine.cancel(Engine(model, tok).add("x"))


def test_per_request_sampling_settings(model, tok):
    configs = [
        greedy(8),
        GenerationConfig(max_new_tokens=8, stop_token_ids=[], do_sample=True, temperature=1.5, seed=5),
        GenerationConfig(max_new_tokens=8, stop_token_ids=[], do_sample=True, top_k=1, temperature=0.7),
        GenerationConfig(max_new_tokens=8, stop_token_ids=[], repetition_penalty=1e6),
        GenerationConfig(max_new_tokens=8, stop_token_ids=[], do_sample=True, top_p=0.9, min_p=0.05, seed=9),
    ]
    engine = Engine(model, tok, max_batch=5)
    reqs = [engine.add(PROMPTS[0], c) for c in configs]
    run(engine)
    solo = [generate(model, tok, PROMPTS[0], c).tokens for c in configs]
    assert [r.tokens for r in reqs] == solo          # each row as if alone (seeded rows too)
    assert reqs[0].tokens == reqs[2].tokens          # top_k = 1 is greedy
    assert len(set(reqs[3].tokens)) == 8 and not set(reqs[3].tokens) & set(tok.encode(PROMPTS[0]))
    assert reqs[1].tokens != reqs[0].tokens          # the hot sampled row really sampled
    again = Engine(model, tok, max_batch=2)
    r1 = again.add(PROMPTS[0], configs[1])
    run(again)
    assert r1.tokens == reqs[1].tokens               # a seeded request reproduces in another batch


def test_events_reassemble_each_request(model, tok):
    engine = Engine(model, tok, max_batch=2)
    engine.sync_every = 3  # tokens read back every third step: events then carry several tokens
    reqs = [engine.add(p, greedy(7)) for p in PROMPTS[:3]]
    events: list[Event] = []
    run(engine, events)
    for r in reqs:
        mine = [e for e in events if e.request is r]
        assert "".join(e.text for e in mine) == r.text == tok.decode(r.tokens, skip_special_tokens=True)
        assert [t for e in mine for t in e.token_ids] == r.tokens
        assert [e.finished for e in mine] == [False] * (len(mine) - 1) + [True]
        assert r.stats.prefill_tokens == r.prompt_tokens and r.stats.decode_tokens == 6
    assert any(len(e.token_ids) > 1 for e in events)
    assert engine.stats.prefill_tokens == sum(r.prompt_tokens for r in reqs)


@pytest.mark.parametrize("sync_every", [1, 3])
def test_first_tokens_before_the_decode_pass(model, tok, monkeypatch, sync_every):
    """step(on_admitted=...) hands the newcomers' first tokens over before the step's decode pass
    (the server's time to first token), and together the early and returned Events are the same
    tokens as without it; a request whose first token is its last finishes in the early Events."""
    sizes = decode_batches(model, monkeypatch)
    engine = Engine(model, tok, max_batch=4)
    engine.sync_every = sync_every
    first = engine.add(PROMPTS[3], greedy(6))  # several prompt tokens: its prefill is no [1, 1] pass
    early_calls: list[tuple[list[Event], int]] = []

    def on_admitted(events):
        early_calls.append((list(events), len(sizes)))  # decode passes run so far

    with pytest.raises(TypeError, match="on_admitted must be callable"):
        engine.step(on_admitted=3)
    assert len(sizes) == 0 and engine.num_waiting == 1  # refused before doing anything
    events = engine.step(on_admitted=on_admitted)
    assert len(early_calls) == 1 and early_calls[0][1] == 0  # before the decode pass
    assert [(e.request, len(e.token_ids)) for e in early_calls[0][0]] == [(first, 1)]
    assert all(e.request is first for e in events) and len(sizes) == 1
    collected = early_calls[0][0] + events
    collected += engine.step(on_admitted=on_admitted)
    assert len(early_calls) == 1  # nothing admitted: not called
    late = [engine.add(PROMPTS[1], greedy(5)), engine.add(PROMPTS[2], greedy(1))]
    returned = engine.step(on_admitted=on_admitted)
    early = early_calls[1][0]
    assert {e.request for e in early if e.token_ids} >= set(late)
    assert any(e.request is late[1] and e.finished for e in early)  # one token: done before decoding
    collected += early + returned  # in the order they were handed over
    while engine.has_work:
        collected += engine.step(on_admitted=on_admitted)
    for r, n in zip([first] + late, [6, 5, 1]):
        solo = generate(model, tok, r.prompt_ids, greedy(n))
        mine = [e for e in collected if e.request is r]
        assert r.tokens == solo.tokens and [t for e in mine for t in e.token_ids] == r.tokens
        assert [e.finished for e in mine][-1] and sum(e.finished for e in mine) == 1


def forwards(model, monkeypatch) -> list[tuple[int, bool]]:
    """Records every forward the model runs: (tokens in it, whether it was packed)."""
    calls = []
    real = type(model).forward

    def spy(self, input_ids, *args, **kw):
        calls.append((input_ids.numel(), kw.get("cu_seqlens") is not None))
        return real(self, input_ids, *args, **kw)

    monkeypatch.setattr(type(model), "forward", spy)
    return calls


@pytest.mark.parametrize("mix", [True, False])
def test_newcomers_ride_in_the_decode_pass(model, tok, monkeypatch, mix):
    """While rows decode, newcomers' prompts go into the decode pass itself (one forward for the
    step: the rows' next tokens, then the prompts packed); a prompt longer than a pack goes in one
    chunk per decode pass; mix_prefill off, prompts get prefill passes of their own. The tokens
    equal each request's solo run."""
    budgets = [9, 6, 5, 4]
    solo = [generate(model, tok, p, greedy(n)).tokens for p, n in zip(PROMPTS, budgets)]
    long_prompt = tok.encode(PROMPTS[3] + " " + PROMPTS[1] + " " + PROMPTS[4])
    solo_long = generate(model, tok, long_prompt, greedy(3)).tokens
    calls = forwards(model, monkeypatch)
    engine = Engine(model, tok, max_batch=4)
    engine.mix_prefill = mix
    reqs = [engine.add(PROMPTS[0], greedy(budgets[0]))]
    engine.step()
    assert [packed for _, packed in calls] == [False, False]  # a prefill, then the decode pass
    del calls[:]
    reqs += [engine.add(p, greedy(n)) for p, n in zip(PROMPTS[1:4], budgets[1:])]
    events = engine.step()
    prompt_tokens = sum(r.prompt_tokens for r in reqs[1:])
    if mix:
        assert calls == [(1 + prompt_tokens, True)]           # one pass: a decode token and three prompts
        assert {e.request for e in events} == set(reqs)        # everyone's token read back
    else:
        assert calls == [(prompt_tokens, True), (4, False)]   # the prompts, then the decode pass
    assert engine.num_active == 4 and [len(r.tokens) for r in reqs] == [3] + [1 if mix else 2] * 3
    run(engine)
    assert [r.tokens for r in reqs] == solo
    assert engine.stats.prefill_tokens == sum(r.prompt_tokens for r in reqs)
    # a prompt longer than prefill_chunk_size: with mixing, one chunk per decode pass; without, its
    # chunks in passes of their own before the decode pass
    engine = Engine(model, tok, max_batch=2, prefill_chunk_size=len(long_prompt) - 1)
    engine.mix_prefill = mix
    first = engine.add(PROMPTS[0], greedy(budgets[0]))
    engine.step()
    del calls[:]
    late = engine.add(long_prompt, greedy(3))
    engine.step()
    if mix:
        assert calls == [(1 + len(long_prompt) - 1, True)] and len(first.tokens) == 3 and late.tokens == []
        assert engine.num_active == 1 and engine.num_waiting == 1
        engine.step()
        assert calls[1:] == [(1 + 1, True)] and len(first.tokens) == 4 and len(late.tokens) == 1
        assert engine.num_active == 2 and engine.num_waiting == 0
    else:
        assert calls == [(len(long_prompt) - 1, False), (1, False), (2, False)]
    run(engine)
    assert first.tokens == solo[0] and late.tokens == solo_long


def test_long_prompts_fill_chunk_by_chunk_beside_the_decoding_rows(model, tok, monkeypatch):
    """A prompt longer than a pack is prefilled one chunk per step inside the decode pass: the
    running rows get a token every step meanwhile, rows that finish mid-fill move the filling row
    up, a fill that outlives every running row goes on alone, a cancelled fill frees its row, and
    every result equals its request's solo run (repetition penalty included)."""
    chunk = 4
    longs = [tok.encode(PROMPTS[3] + " " + PROMPTS[1]), tok.encode(PROMPTS[4] + " " + PROMPTS[2] + " " + PROMPTS[0])]
    assert all(len(ids) > 2 * chunk for ids in longs)
    penalised = GenerationConfig(max_new_tokens=5, stop_token_ids=[], repetition_penalty=1.3)
    solo_short = [generate(model, tok, PROMPTS[0], greedy(3)).tokens, generate(model, tok, PROMPTS[1], greedy(30)).tokens]
    solo_long = [generate(model, tok, longs[0], penalised).tokens, generate(model, tok, longs[1], greedy(4)).tokens]
    calls = forwards(model, monkeypatch)
    engine = Engine(model, tok, max_batch=3, prefill_chunk_size=chunk)
    short = [engine.add(PROMPTS[0], greedy(3)), engine.add(PROMPTS[1], greedy(30))]
    engine.step()
    late = engine.add(longs[0], penalised)
    queued = engine.add(longs[1], greedy(4))
    del calls[:]
    steps = 0
    while late.tokens == []:
        before = [len(r.tokens) for r in short]
        engine.step()
        steps += 1
        # every step: one pass, the running rows' tokens and one chunk of the long prompt
        assert len(calls) == steps and calls[-1][1]
        assert [len(r.tokens) for r in short] == [min(n + 1, 3) if i == 0 else n + 1 for i, n in enumerate(before)]
        assert queued.tokens == [] and engine.num_waiting == (2 if late.tokens == [] else 1)
    assert steps == -(-len(longs[0]) // chunk)
    assert short[0].done and engine.num_active == 2  # the first short request finished mid-fill
    assert [n - running for (n, _), running in zip(calls, [2] + [1] * (steps - 1))] == \
        [chunk] * (steps - 1) + [len(longs[0]) - chunk * (steps - 1)]
    run(engine)
    assert [r.tokens for r in short] == solo_short and [late.tokens, queued.tokens] == solo_long
    # a fill that outlives the running rows goes on alone; a cancelled fill frees its row
    engine = Engine(model, tok, max_batch=2, prefill_chunk_size=chunk)
    brief = engine.add(PROMPTS[0], greedy(3))
    engine.step()
    alone = engine.add(longs[1], greedy(4))
    engine.step()
    assert brief.done and engine.num_active == 0 and engine.num_waiting == 1 and alone.tokens == []
    del calls[:]
    run(engine)
    assert alone.tokens == solo_long[1] and brief.tokens == solo_short[0]
    assert calls[0] == (chunk, True)  # the next chunk, in a pass of its own
    engine = Engine(model, tok, max_batch=2, prefill_chunk_size=chunk)
    runner = engine.add(PROMPTS[1], greedy(30))
    engine.step()
    doomed = engine.add(longs[1], greedy(4))
    engine.step()
    assert engine.num_waiting == 1 and doomed.tokens == []
    engine.cancel(doomed)
    events = engine.step()
    assert doomed.done and doomed.stop_reason == "cancelled" and any(e.request is doomed and e.finished for e in events)
    assert engine.num_waiting == 0 and engine.num_active == 1
    after = engine.add(longs[0], penalised)
    while after.tokens == []:
        engine.step()
    engine.cancel(runner)
    run(engine)
    assert after.tokens == solo_long[0] and runner.tokens == solo_short[1][:len(runner.tokens)]


def test_stop_token_and_result_objects(model, tok):
    free = generate(model, tok, PROMPTS[1], greedy(10))
    stop = free.tokens[4]
    engine = Engine(model, tok)
    r = engine.add(tok.encode(PROMPTS[1]), GenerationConfig(max_new_tokens=10, stop_token_ids=[stop]))
    assert isinstance(r, Request) and r.stop_reason is None and not r.done and r.prompt_tokens > 0
    run(engine)
    res = r.result()
    assert res.stop_reason == "stop_token" and res.tokens == free.tokens[:free.tokens.index(stop)]


def test_add_checks_its_input(model, tok):
    engine = Engine(model, tok, max_batch=2, max_seq_len=16)
    with pytest.raises(ValueError, match="no tokens"):
        engine.add("")
    with pytest.raises(ValueError, match="longer than the engine's max_seq_len of 16"):
        engine.add([5] * 17)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        engine.add([5, model.config.vocab_size])
    with pytest.raises(TypeError, match="one prompt"):
        engine.add(["a", "b"])
    with pytest.raises(TypeError, match="config"):
        engine.add("a", {"max_new_tokens": 3})
    with pytest.raises(ValueError, match="max_batch"):
        Engine(model, tok, max_batch=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        Engine(model, tok, max_seq_len=model.config.max_position_embeddings + 1)
    assert not engine.has_work and engine.step() == []
    # a row's budget is bounded by max_seq_len: prompt 14 + 3 new tokens fill the 16 cached
    r = engine.add([5] * 14, greedy(10))
    run(engine)
    assert r.stop_reason == "length" and len(r.tokens) == 3


def test_cuda_graphs_setting(model, tok):
    """cuda_graphs is an Engine argument (a bool; off on a CPU, where nothing is captured) and a
    GenerationConfig field for generate / stream; DecodeGraphs refuses a cache outside a GPU."""
    from exaone_ext.generation.cuda_graphs import DecodeGraphs
    from exaone_ext.model import KVCache

    with pytest.raises(TypeError, match="cuda_graphs must be a bool, got str"):
        Engine(model, tok, cuda_graphs="yes")
    with pytest.raises(TypeError, match="GenerationConfig.cuda_graphs: expected bool, got int"):
        GenerationConfig(cuda_graphs=1)
    engine = Engine(model, tok, max_batch=2)
    assert engine.cuda_graphs is False  # a CPU model
    r = engine.add(PROMPTS[0], greedy(3))
    run(engine)
    assert engine._graphs is None and len(r.tokens) == 3
    assert generate(model, tok, PROMPTS[0], greedy(3).replace(cuda_graphs=False)).tokens == r.tokens
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA KV cache, got one on cpu"):
        DecodeGraphs(model, KVCache(model.config, 2, 8, torch.float32), 2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA: no device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replay_matches_the_eager_forward(ckpt, dtype):
    """DecodeGraphs against the eager forward on a copy of the same cache, step after step, for
    4, 3 (padded to the bucket of 4), 2 and 1 rows: the logits agree to the dtype's rounding (the graph's
    split-KV plan is made for the cache's whole length, the eager one for the rows' lengths), the
    cache contents and lengths, device and host, agree."""
    from exaone_ext.generation.cuda_graphs import DecodeGraphs
    from exaone_ext.model import KVCache

    model = ExaoneForCausalLM.from_pretrained(ckpt, dtype=dtype, device="cuda")
    V = model.config.vocab_size
    torch.manual_seed(0)
    graphed, eager = (KVCache(model.config, 4, 64, dtype, "cuda") for _ in range(2))
    lengths = [9, 5, 13, 2]
    prompts = [torch.randint(0, V, (n,), device="cuda") for n in lengths]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device="cuda")
    with torch.inference_mode():
        for cache in (graphed, eager):
            model(torch.cat(prompts), cu_seqlens=cu, kv_cache=cache, num_logits_to_keep=1)
        graphs = DecodeGraphs(model, graphed, 4, capture_after=1)
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        replayed = 0
        for n in [4, 4, 3, 3, 3, 2, 2, 2, 1, 1]:  # rows leave as in the Engine: rows past n are free
            tokens = torch.randint(0, V, (n,), device="cuda")
            got = graphs.logits(tokens)
            if got is None:  # an eager step (the bucket not captured yet): the same forward
                got = model(tokens[:, None], kv_cache=graphed.rows(0, n), num_logits_to_keep=1)[:, -1]
            else:
                replayed += 1
            want = model(tokens[:, None], kv_cache=eager.rows(0, n), num_logits_to_keep=1)[:, -1]
            assert got.shape == (n, V)
            assert (got - want).abs().max().item() <= tol * want.abs().max().item()
            assert graphed.seqlens[:n].tolist() == eager.seqlens[:n].tolist() == graphed.host_seqlens[:n].tolist()
            for (kg, vg), (ke, ve) in zip(graphed.layers, eager.layers):
                for b in range(n):
                    m = int(eager.host_seqlens[b])
                    torch.testing.assert_close(kg[b, :m], ke[b, :m], rtol=tol, atol=tol)
                    torch.testing.assert_close(vg[b, :m], ve[b, :m], rtol=tol, atol=tol)
        assert graphs.disabled is None and replayed >= 5 and set(graphs._captured) == {1, 2, 4}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA: no device")
def test_cuda_graph_decode_equals_eager(ckpt, tok):
    """On a GPU the Engine's decode steps replay CUDA graphs (a bucket captured after a few eager
    steps of its size; padded rows; rows joining and leaving move between buckets), and every token
    equals the eager engine's (float32: the graph's split-KV plan differs from the eager one by
    rounding only). Greedy and seeded sampling."""
    model = ExaoneForCausalLM.from_pretrained(ckpt, dtype=torch.float32, device="cuda")
    budgets = [40, 12, 30, 7, 25]
    configs = [greedy(n) if i % 2 == 0 else
               GenerationConfig(max_new_tokens=n, stop_token_ids=[], do_sample=True, top_k=20, seed=i)
               for i, n in enumerate(budgets)]

    def drive(cuda_graphs):
        engine = Engine(model, tok, max_batch=4, cuda_graphs=cuda_graphs)
        reqs = [engine.add(PROMPTS[0], configs[0]), engine.add(PROMPTS[1], configs[1])]
        for _ in range(10):
            engine.step()
        reqs += [engine.add(p, c) for p, c in zip(PROMPTS[2:], configs[2:])]  # 3 rows, then 4, one waits
        run(engine)
        return engine, [r.tokens for r in reqs]

    eager, expected = drive(False)
    assert eager._graphs is None
    graphed, got = drive(True)
    assert graphed._graphs is not None and graphed._graphs.disabled is None
    assert graphed._graphs.replays > 20 and len(graphed._graphs._captured) >= 2  # several buckets replayed
    assert got == expected
    assert [len(t) for t in got] == budgets
