"""Sampling controls on crafted logits, and generation with the real ExaoneForCausalLM (tiny random
config) and the real tiny tokenizer: KV-cache decode vs full recomputation, ragged batches vs one
by one, stop tokens / strings / length, streaming that reassembles English and Korean."""
from __future__ import annotations

import pytest
import torch

from exaone_ext.generation import GenerationConfig, engine, generate, prepare_prompts, select_next_tokens, stream
from exaone_ext.generation.sampling import (apply_min_p, apply_repetition_penalty, apply_top_k, apply_top_p, draw,
                                            draw_inverse_cdf, draw_race, process_logits)
from exaone_ext.model import ExaoneForCausalLM
from exaone_ext.tokenizer import ExaoneTokenizer


KOREAN = "안녕하세요. 한국의 수도는 서울입니다. 감사합니다!"
ENGLISH = "Hello, how are you today? The capital of Korea is Seoul."
KOREAN_UNSEEN = "한강 옆에서 김치찌개를 먹었습니다. 정말 맛있었어요!"  # syllables the tiny vocabulary splits


# ---------------------------------------------------------------------------- sampling on crafted logits
def sample_many(logits_row: torch.Tensor, config: GenerationConfig, n: int = 20000, seed: int = 0,
                seen: torch.Tensor | None = None) -> torch.Tensor:
    logits = logits_row.expand(n, -1).clone()
    g = torch.Generator().manual_seed(seed)
    return select_next_tokens(logits, config, None if seen is None else seen.expand(n, -1), g)


def test_top_k_1_equals_greedy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 1000, generator=g) * 3
    greedy = select_next_tokens(logits, GenerationConfig())
    for seed in range(3):
        sampled = select_next_tokens(logits, GenerationConfig(do_sample=True, top_k=1, temperature=1.7),
                                     generator=torch.Generator().manual_seed(seed))
        assert torch.equal(sampled, greedy)
    assert torch.equal(greedy, logits.argmax(-1))


def test_temperature_zero_is_greedy():
    logits = torch.randn(16, 50)
    cfg = GenerationConfig(do_sample=True, temperature=0.0)
    assert cfg.greedy and torch.equal(select_next_tokens(logits, cfg), logits.argmax(-1))


def test_sampling_follows_softmax_with_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    for t in (1.0, 0.5, 2.0):
        draws = sample_many(logits, GenerationConfig(do_sample=True, temperature=t), n=40000)
        freq = torch.bincount(draws, minlength=4).double() / draws.numel()
        expected = (logits[0].double() / t).softmax(-1)
        assert (freq - expected).abs().max() < 0.01, (t, freq, expected)
    # Lower temperature concentrates on the best token.
    cold = (sample_many(logits, GenerationConfig(do_sample=True, temperature=0.2)) == 0).float().mean()
    hot = (sample_many(logits, GenerationConfig(do_sample=True, temperature=5.0)) == 0).float().mean()
    assert cold > 0.99 and hot < 0.4


def test_top_k_keeps_only_k_best():
    logits = torch.tensor([[0.1, 3.0, 2.0, -1.0, 2.5, 0.0]])
    assert torch.isinf(apply_top_k(logits, 3)).tolist() == [[True, False, False, True, False, True]]
    draws = sample_many(logits, GenerationConfig(do_sample=True, top_k=3, temperature=3.0))
    assert set(draws.unique().tolist()) == {1, 2, 4}


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    kept = lambda p: (~torch.isinf(apply_top_p(logits, p))).nonzero()[:, 1].tolist()  # noqa: E731
    assert kept(0.5) == [1]           # 0.5 alone reaches 0.5
    assert kept(0.7) == [1, 3]        # 0.5 + 0.3
    assert kept(0.9) == [1, 2, 3]     # 0.95 needed to pass 0.9
    assert kept(1.0) == [0, 1, 2, 3]
    draws = sample_many(logits, GenerationConfig(do_sample=True, top_p=0.7))
    freq = torch.bincount(draws, minlength=4).double() / draws.numel()
    assert set(draws.unique().tolist()) == {1, 3}
    assert abs(freq[1].item() - 0.5 / 0.8) < 0.015   # renormalised over the nucleus


def test_min_p_drops_unlikely_tokens():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    assert (~torch.isinf(apply_min_p(logits, 0.2))).tolist() == [[True, True, True, False]]
    assert (~torch.isinf(apply_min_p(logits, 0.5))).tolist() == [[True, True, False, False]]
    draws = sample_many(logits, GenerationConfig(do_sample=True, min_p=0.5))
    assert set(draws.unique().tolist()) == {0, 1}


def test_repetition_penalty():
    logits = torch.tensor([[4.0, 3.0, -1.0, -2.0]])
    seen = torch.tensor([[True, False, True, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[2.0, 3.0, -2.0, -2.0]]  # positive divided, negative multiplied, unseen unchanged
    assert select_next_tokens(logits, GenerationConfig(repetition_penalty=2.0), seen).item() == 1
    assert select_next_tokens(logits, GenerationConfig(repetition_penalty=1.0), seen).item() == 0
    # Sampling sees the penalised logits too.
    draws = sample_many(logits, GenerationConfig(do_sample=True, repetition_penalty=2.0), seen=seen)
    freq = torch.bincount(draws, minlength=4).double() / draws.numel()
    assert (freq - out[0].double().softmax(-1)).abs().max() < 0.015


def test_seed_reproduces_and_differs():
    logits = torch.randn(8, 500)
    cfg = GenerationConfig(do_sample=True)
    a = select_next_tokens(logits, cfg, generator=torch.Generator().manual_seed(7))
    b = select_next_tokens(logits, cfg, generator=torch.Generator().manual_seed(7))
    c = select_next_tokens(logits, cfg, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("draw_fn", [draw, draw_race, draw_inverse_cdf])
def test_masked_tokens_never_drawn(draw_fn):
    # A draw must never land on a zero-probability token, even with many rows and a huge vocabulary.
    logits = torch.full((256, 4096), float("-inf"))
    logits[:, 17] = 0.0
    logits[:, 4000] = -1.0
    draws = draw_fn(logits.softmax(-1), torch.Generator().manual_seed(0))
    assert set(draws.unique().tolist()) <= {17, 4000}
    assert (draws == 17).float().mean() > 0.6


@pytest.mark.parametrize("draw_fn", [draw, draw_race, draw_inverse_cdf])
def test_draw_follows_probabilities(draw_fn):
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3]]).expand(40000, -1)
    draws = draw_fn(probs, torch.Generator().manual_seed(1))
    freq = torch.bincount(draws, minlength=4).double() / draws.numel()
    assert (freq - probs[0].double()).abs().max() < 0.01


@pytest.mark.parametrize("top_p, scale", [(0.9, 4.0), (0.999, 0.05)])
def test_top_p_probe_equals_full_sort(top_p, scale):
    # A peaked distribution (nucleus within the probe) and a flat one (needs the full sort): both must
    # keep exactly the nucleus of the full vocabulary.
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 5000, generator=g) * scale
    cfg = GenerationConfig(do_sample=True, top_p=top_p)
    nucleus = ~torch.isinf(apply_top_p(logits, top_p))
    draws = select_next_tokens(logits.repeat(2000, 1), cfg, generator=torch.Generator().manual_seed(0))
    rows = draws.view(2000, 3)
    for r in range(3):
        assert nucleus[r, rows[:, r]].all()
    probs = logits.softmax(-1).masked_fill(~nucleus, 0)
    expected = probs / probs.sum(-1, keepdim=True)
    best = expected.argmax(-1)
    hits = (rows == best).float().mean(0)
    assert (hits - expected[torch.arange(3), best]).abs().max() < 0.04


def test_combined_controls_match_processed_distribution():
    # select_next_tokens (top-k candidates only) samples from softmax(process_logits(...)) (whole vocabulary).
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 12, generator=g) * 2
    seen = torch.zeros(1, 12, dtype=torch.bool)
    seen[0, logits[0].argmax()] = True
    cfg = GenerationConfig(do_sample=True, temperature=0.9, top_k=6, top_p=0.8, min_p=0.05, repetition_penalty=1.3)
    expected = process_logits(logits, cfg, seen).double().softmax(-1)[0]
    assert 1 < int((expected > 0).sum()) < 6  # the controls really cut something
    draws = sample_many(logits, cfg, n=40000, seen=seen)
    freq = torch.bincount(draws, minlength=12).double() / draws.numel()
    assert (freq - expected).abs().max() < 0.012
    assert set(draws.unique().tolist()) == set((expected > 0).nonzero()[:, 0].tolist())


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-1), "top_k"), (dict(top_k=True), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(min_p=-0.1), "min_p"), (dict(min_p=2.0), "min_p"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(stop_token_ids=[-1]), r"stop_token_ids\[0\]"), (dict(stop_token_ids=["a"]), r"stop_token_ids\[0\]"),
    (dict(stop_strings=[""]), r"stop_strings\[0\]"), (dict(seed="x"), "seed"), (dict(do_sample=1), "do_sample"),
])
def test_config_validation(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        GenerationConfig(**kwargs)


def test_config_conveniences(tmp_path):
    cfg = GenerationConfig(stop_token_ids=5, stop_strings="END")
    assert cfg.stop_token_ids == [5] and cfg.stop_strings == ["END"]
    assert cfg.replace(top_k=3).top_k == 3
    with pytest.raises(ValueError, match="top_k"):
        cfg.replace(top_k=-3)
    (tmp_path / "generation_config.json").write_text('{"do_sample": true, "temperature": 0.7, "bos_token_id": 1}')
    loaded = GenerationConfig.from_pretrained(tmp_path, max_new_tokens=9)
    assert loaded.do_sample and loaded.temperature == 0.7 and loaded.max_new_tokens == 9


# ---------------------------------------------------------------------------- the real model
@pytest.fixture(scope="module")
def tok(ckpt):
    return ExaoneTokenizer.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def model(ckpt):
    return ExaoneForCausalLM.from_pretrained(ckpt)


PROMPTS = ["Hello", "The capital of Korea is", "안녕하세요. 저는", "Large language models predict the next token"]


@torch.inference_mode()
def greedy_no_cache(model, ids: list[int], n: int) -> list[int]:
    """Reference: recompute the whole sequence for every new token."""
    seq = list(ids)
    for _ in range(n):
        logits = model(torch.tensor([seq]))
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(ids):]


def test_kv_cache_decode_equals_full_recomputation(model, tok):
    ids = tok.encode(PROMPTS[1])
    res = generate(model, tok, ids, GenerationConfig(max_new_tokens=12, stop_token_ids=[]))
    assert res.stop_reason == "length" and len(res.tokens) == 12
    assert res.tokens == greedy_no_cache(model, ids, 12)


def test_chunked_prefill_equals_whole(model, tok):
    ids = tok.encode(PROMPTS[3] + " " + PROMPTS[2])
    cfg = GenerationConfig(max_new_tokens=6, stop_token_ids=[])
    assert generate(model, tok, ids, cfg, prefill_chunk_size=3).tokens == generate(model, tok, ids, cfg).tokens


def test_batched_equals_one_by_one(model, tok):
    cfg = GenerationConfig(max_new_tokens=10, stop_token_ids=[])
    singles = [generate(model, tok, p, cfg) for p in PROMPTS]
    batched = generate(model, tok, PROMPTS, cfg)
    assert [r.tokens for r in batched] == [r.tokens for r in singles]
    assert [r.text for r in batched] == [r.text for r in singles]
    assert len({len(tok.encode(p)) for p in PROMPTS}) == len(PROMPTS)  # the batch really is ragged


@pytest.mark.parametrize("chunk", [None, 1, 9, 14])
def test_packed_prefill_equals_one_by_one(model, tok, monkeypatch, chunk):
    """Neighbouring prompts share a packed forward (up to `chunk` tokens a pack); a prompt too long
    for a pack goes alone in chunks. Every grouping gives the one-by-one tokens."""
    prompts = PROMPTS + [PROMPTS[0], PROMPTS[1] + " " + PROMPTS[3]]
    lengths = [len(tok.encode(p)) for p in prompts]
    assert min(lengths) < 9 < max(lengths)  # chunk 9: some prompts pack, the longest is chunked alone
    packs = []
    real = type(model).forward

    def spy(self, input_ids, *args, cu_seqlens=None, **kw):
        packs.append(0 if cu_seqlens is None else cu_seqlens.numel() - 1)
        return real(self, input_ids, *args, cu_seqlens=cu_seqlens, **kw)

    cfg = GenerationConfig(max_new_tokens=5, stop_token_ids=[], repetition_penalty=1.3)
    singles = [generate(model, tok, p, cfg).tokens for p in prompts]
    monkeypatch.setattr(type(model), "forward", spy)
    batched = generate(model, tok, prompts, cfg, prefill_chunk_size=chunk)
    assert [r.tokens for r in batched] == singles
    if chunk != 1:
        assert max(packs) >= 2  # some forward really was packed
    else:
        assert max(packs) == 0


@pytest.mark.parametrize("sync_every", [1, 4])
def test_rows_stopping_at_different_times(model, tok, monkeypatch, sync_every):
    # Rows that stop are dropped from the batch (their cache rows moved); the others must be unaffected.
    monkeypatch.setitem(engine._SYNC_EVERY, "cpu", sync_every)
    free = generate(model, tok, PROMPTS, GenerationConfig(max_new_tokens=10, stop_token_ids=[]))
    # A stop token that ends some rows early: the 3rd token of row 1 (first occurrence in each row decides).
    stop = free[1].tokens[2]
    cfg = GenerationConfig(max_new_tokens=10, stop_token_ids=[stop])
    batched = generate(model, tok, PROMPTS, cfg)
    for p, r, f in zip(PROMPTS, batched, free):
        cut = f.tokens.index(stop) if stop in f.tokens else None
        assert r.tokens == f.tokens[:cut]
        assert r.stop_reason == ("stop_token" if cut is not None else "length")
        assert r.tokens == generate(model, tok, p, cfg).tokens
    assert batched[1].stop_reason == "stop_token" and len(batched[1].tokens) <= 2


def test_top_k_1_generation_equals_greedy(model, tok):
    greedy = generate(model, tok, PROMPTS[:2], GenerationConfig(max_new_tokens=8, stop_token_ids=[]))
    topk1 = generate(model, tok, PROMPTS[:2], GenerationConfig(max_new_tokens=8, stop_token_ids=[], do_sample=True,
                                                               top_k=1, temperature=0.8, seed=3))
    assert [r.tokens for r in topk1] == [r.tokens for r in greedy]


def test_seed_reproduces_generation(model, tok):
    cfg = GenerationConfig(max_new_tokens=12, stop_token_ids=[], do_sample=True, temperature=1.5, seed=11)
    a = generate(model, tok, PROMPTS, cfg)
    b = generate(model, tok, PROMPTS, cfg)
    c = generate(model, tok, PROMPTS, cfg.replace(seed=12))
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert [r.tokens for r in a] != [r.tokens for r in c]


def test_repetition_penalty_in_generation(model, tok):
    ids = tok.encode(PROMPTS[0])
    plain = generate(model, tok, ids, GenerationConfig(max_new_tokens=16, stop_token_ids=[]))
    assert len(set(plain.tokens)) < len(plain.tokens)  # this random model repeats itself
    penalised = generate(model, tok, ids, GenerationConfig(max_new_tokens=16, stop_token_ids=[],
                                                           repetition_penalty=1e6))
    assert len(set(penalised.tokens)) == 16 and not set(penalised.tokens) & set(ids)


def test_default_stop_token_is_endofturn(model, tok):
    # Force [|endofturn|] to be the argmax after 3 tokens: the default config must stop there.
    free = generate(model, tok, PROMPTS[2], GenerationConfig(max_new_tokens=6))
    assert tok.eos_token_id not in free.tokens
    scripted = ScriptedModel(model, tok.encode("abc") + [tok.eos_token_id], start=len(tok.encode(PROMPTS[2])))
    res = generate(scripted, tok, PROMPTS[2], GenerationConfig(max_new_tokens=6))
    assert res.stop_reason == "stop_token" and res.tokens == tok.encode("abc") and res.text == "abc"


def test_length_and_context_limits(model, tok):
    ctx = model.config.max_position_embeddings
    res = generate(model, tok, [5] * (ctx - 3), GenerationConfig(max_new_tokens=10, stop_token_ids=[]))
    assert res.stop_reason == "length" and len(res.tokens) == 4  # positions ctx-3 .. ctx cover 4 new tokens
    assert generate(model, tok, [5] * ctx, GenerationConfig(max_new_tokens=10, stop_token_ids=[])).tokens.__len__() == 1
    with pytest.raises(ValueError, match=r"prompts\[1\]: 513 tokens is longer than the model's context of 512"):
        generate(model, tok, [[5, 6], [5] * (ctx + 1)])
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        generate(model, tok, [5, model.config.vocab_size])
    with pytest.raises(ValueError, match="no tokens"):
        generate(model, tok, "")
    with pytest.raises(ValueError, match="empty list"):
        generate(model, tok, [])
    with pytest.raises(TypeError, match=r"prompts\[1\]"):
        generate(model, tok, ["ok", 3.5])
    with pytest.raises(TypeError, match="config"):
        generate(model, tok, "hi", {"max_new_tokens": 3})
    with pytest.raises(ValueError, match="prefill_chunk_size"):
        generate(model, tok, "hi", prefill_chunk_size=0)


def test_prompt_forms(tok):
    chat = [{"role": "user", "content": "안녕"}]
    ids, single = prepare_prompts(tok, chat)
    assert single and ids == [tok.apply_chat_template(chat, tokenize=True)]
    ids, single = prepare_prompts(tok, ["hi", [1, 2, 3], chat, torch.tensor([4, 5])])
    assert not single and ids == [tok.encode("hi"), [1, 2, 3], tok.apply_chat_template(chat, tokenize=True), [4, 5]]
    assert prepare_prompts(tok, torch.tensor([[1, 2], [3, 4]])) == ([[1, 2], [3, 4]], False)


def test_stats(model, tok):
    res = generate(model, tok, PROMPTS[:3], GenerationConfig(max_new_tokens=5, stop_token_ids=[]))
    s = res[0].stats
    assert s.prefill_tokens == sum(len(tok.encode(p)) for p in PROMPTS[:3])
    assert s.decode_tokens == 3 * 5 - 3
    assert s.prefill_tokens_per_s > 0 and s.decode_tokens_per_s > 0
    assert res[0].prompt_tokens == len(tok.encode(PROMPTS[0]))


# ---------------------------------------------------------------------------- text: stop strings, streaming
class ScriptedModel(torch.nn.Module):
    """The real model with a large bonus added to a scripted token at each generated position, so that
    greedy decoding produces a chosen text through the real cache, sampler and detokeniser."""

    def __init__(self, model, script: list[int], start: int):
        super().__init__()
        self.model, self.script, self.start = model, script, start
        self.config = model.config

    def forward(self, input_ids, kv_cache=None, **kw):
        logits = self.model(input_ids, kv_cache=kv_cache, **kw)                  # [b, k, V]
        pos = kv_cache.seqlens.long() - self.start                                # index of the token predicted now
        for b, p in enumerate(pos.tolist()):
            if 0 <= p < len(self.script):
                logits[b, -1, self.script[p]] += 1e4
        return logits


@pytest.mark.parametrize("text", [ENGLISH, KOREAN, KOREAN_UNSEEN, "혼합 mixed 텍스트 🙂 끝"])
def test_stream_reassembles_full_text(model, tok, text):
    prompt = [{"role": "user", "content": "Say something."}]
    start = len(tok.apply_chat_template(prompt, tokenize=True))
    script = tok.encode(text) + [tok.eos_token_id]
    scripted = ScriptedModel(model, script, start)
    s = stream(scripted, tok, prompt, GenerationConfig(max_new_tokens=100))
    pieces = list(s)
    assert "".join(pieces) == text == s.result.text
    assert s.result.stop_reason == "stop_token" and s.result.tokens == script[:-1]
    assert not any("\ufffd" in p for p in pieces)
    out = ""
    for p in pieces:
        out += p
        assert text.startswith(out)
    # Korean is split inside characters by this vocabulary, so some tokens produced no text at once.
    if text is KOREAN_UNSEEN:
        assert len(pieces) < len(script) - 1
    assert generate(scripted, tok, prompt, GenerationConfig(max_new_tokens=100)).text == text


def test_stop_strings(model, tok):
    text = "The capital of Korea is Seoul. 서울은 큰 도시입니다."
    prompt = "Q:"
    start = len(tok.encode(prompt))
    scripted = ScriptedModel(model, tok.encode(text), start)
    for stop, expected in [("Seoul", "The capital of Korea is "), ("큰 도시", "The capital of Korea is Seoul. 서울은 "),
                           ("is S", "The capital of Korea ")]:
        cfg = GenerationConfig(max_new_tokens=60, stop_strings=["never appears", stop])
        res = generate(scripted, tok, prompt, cfg)
        assert res.stop_reason == "stop_string" and res.text == expected
        assert tok.decode(res.tokens).startswith(expected + stop[:1])  # tokens up to the one completing it
        s = stream(scripted, tok, prompt, cfg)
        pieces = list(s)
        assert "".join(pieces) == expected == s.result.text
        # Text that might begin a stop string is held back until it cannot.
        assert all(stop not in "".join(pieces[:i + 1]) for i in range(len(pieces)))
    # A stop string that never completes: all text comes out, stop at the length limit.
    res = generate(scripted, tok, prompt, GenerationConfig(max_new_tokens=len(tok.encode(text)),
                                                           stop_strings=["Seoul!"]))
    assert res.text == text and res.stop_reason == "length"


def test_batch_callback_streams_each_row(model, tok):
    pieces: dict[int, list[str]] = {}
    results = generate(model, tok, PROMPTS, GenerationConfig(max_new_tokens=8, stop_token_ids=[]),
                       callback=lambda row, piece: pieces.setdefault(row, []).append(piece))
    for i, r in enumerate(results):
        assert "".join(pieces.get(i, [])) == r.text == tok.decode(r.tokens, skip_special_tokens=True)


def test_stream_takes_one_prompt(model, tok):
    with pytest.raises(TypeError, match="one prompt"):
        stream(model, tok, ["a", "b"])


def test_stream_consumer_time_is_not_decode_time(model, tok, monkeypatch):
    """On a clock of our own (no wall-clock sleeps): each forward takes 1 s, the consumer 100 s per
    piece; the stats must count the forwards only."""
    from types import SimpleNamespace

    clock = [0.0]
    monkeypatch.setattr(engine, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    forward = model.forward

    def ticking(*args, **kwargs):
        clock[0] += 1.0
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", ticking)
    s = stream(model, tok, PROMPTS[0], GenerationConfig(max_new_tokens=4, stop_token_ids=[]))
    pieces = 0
    for _ in s:
        clock[0] += 100.0
        pieces += 1
    assert pieces > 0 and clock[0] >= 100.0 * pieces + 4
    # one prefill forward; 4 tokens: the first from the prefill logits, then 3 decode forwards
    assert s.result.stats.prefill_seconds == 1.0
    assert s.result.stats.decode_seconds == 3.0


def test_default_stop_ids_include_model_eos(model, tok):
    cfg = GenerationConfig()
    assert engine._stop_ids(tok, model, cfg) == {tok.eos_token_id, model.config.eos_token_id}

    class Other:
        config = type("C", (), {"eos_token_id": [7, 9]})()

    assert engine._stop_ids(tok, Other(), cfg) == {tok.eos_token_id, 7, 9}
    assert engine._stop_ids(tok, Other(), GenerationConfig(stop_token_ids=[5])) == {5}
    assert engine._stop_ids(tok, Other(), GenerationConfig(stop_token_ids=[])) == set()


# ---------------------------------------------------------------------------- conversation history
def test_trim_history_drops_oldest_turns(tok):
    from exaone_ext.generation import trim_history
    system = [{"role": "system", "content": "Be brief."}]
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": f"question {i} " + ENGLISH}, {"role": "assistant", "content": KOREAN}]
    last = {"role": "user", "content": "and now?"}
    messages = system + turns + [last]
    full = len(tok.apply_chat_template(messages, tokenize=True))
    same, dropped = trim_history(tok, messages, full)
    assert same == messages and dropped == 0
    kept, dropped = trim_history(tok, messages, full - 1)
    # one whole turn (user + reply) went, the oldest one
    assert dropped == 2 and kept == system + turns[2:] + [last]
    limit = len(tok.apply_chat_template(system + [last], tokenize=True)) + 5
    kept, dropped = trim_history(tok, messages, limit)
    assert kept == system + [last] and dropped == 12
    assert len(tok.apply_chat_template(kept, tokenize=True)) <= limit
    # too long even alone: returned as short as it gets, generation then reports the length
    kept, _ = trim_history(tok, messages, 3)
    assert kept == system + [last]
    # without a system message, and a leading assistant message goes with the first turn
    lone = [{"role": "assistant", "content": KOREAN}] + turns[:2] + [last]
    kept, dropped = trim_history(tok, lone, len(tok.apply_chat_template(turns[:2] + [last], tokenize=True)))
    assert kept == turns[:2] + [last] and dropped == 1
    with pytest.raises(ValueError, match="max_tokens"):
        trim_history(tok, messages, 0)
