"""exaone_ext.data: streaming, packing, SFT masks, preference pairs, resume state, bad input."""
from __future__ import annotations

import json
import random

import pytest
import torch

from exaone_ext import ExaoneForCausalLM, ExaoneTokenizer
from exaone_ext.data import (IGNORE_INDEX, DataError, DocumentReader, PreferenceData, PretrainStream, SFTStream,
                             collate, encode_chat, preference_rows, shard)

WORDS = "the quick brown fox jumps over lazy dog 서울 한국 모델 날씨 공원 model token cache".split()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok(ckpt):
    return ExaoneTokenizer.from_pretrained(ckpt)


def _docs(n, seed, lo=3, hi=60):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def _jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return str(path)


def test_reader_text_paragraphs_lines_and_resume(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("one\ntwo\n\n\nthree\n\nfour\n", encoding="utf-8")
    r = DocumentReader([str(p)])
    got = [r.next() for _ in range(4)]
    assert [g[0] for g in got] == ["one\ntwo", "three", "four", "one\ntwo"]   # paragraphs, then epoch 2
    assert got[1][1] == f"{p}:5" and r.epoch == 1
    lines = DocumentReader([str(p)], split="line")
    assert [lines.next()[0] for _ in range(4)] == ["one", "two", "three", "four"]
    r = DocumentReader([str(p)])
    r.next()
    state = r.state_dict()
    rest = [r.next()[0] for _ in range(3)]
    r2 = DocumentReader([str(p)])
    r2.load_state_dict(state)
    assert [r2.next()[0] for _ in range(3)] == rest


@pytest.mark.parametrize("stage", [1, 2])
def test_pretrain_packing_rows(tmp_path, tok, stage):
    docs = _docs(40, seed=stage, hi=60 if stage == 1 else 12)
    files = [_jsonl(tmp_path / "a.jsonl", docs)]
    kw = dict(replay_files=[_jsonl(tmp_path / "r.jsonl", _docs(30, seed=9, hi=200))], replay_fraction=0.3,
              replay_len=24) if stage == 2 else {}
    s = PretrainStream(tok, files, seq_len=64, **kw)
    rows = [s.next_row() for _ in range(12)]
    encoded = {tuple(tok.encode(d) + [tok.eos_token_id]) for d in docs}
    for row in rows:
        assert len(row.ids) == len(row.labels) == sum(row.lengths) == 64
        batch = collate([row])
        assert batch.cu_seqlens.dtype == torch.int32 and batch.cu_seqlens[-1] == 64
        cu = batch.cu_seqlens.tolist()
        for a, b in zip(cu, cu[1:]):
            assert batch.position_ids[0, a:b].tolist() == list(range(b - a))
            # a label is the next token of the same piece, except at a piece's end
            lab = batch.labels[0, a:b].tolist()
            assert lab[:-1] == batch.input_ids[0, a + 1:b].tolist() or all(x == IGNORE_INDEX for x in lab)
    if stage == 1:
        # tight rows: the concatenated ids are the documents in order, cut anywhere
        flat = [t for r in rows for t in r.ids]
        stream = [t for d in docs for t in tok.encode(d) + [tok.eos_token_id]]
        assert flat == stream[:len(flat)]
        assert all(n <= 64 for r in rows for n in r.lengths)
    else:
        # stage 2: a document of the main set is never cut (all are shorter than 64 tokens)
        pieces = [tuple(r.ids[a:a + n]) for r in rows for a, n in zip([0] + list(_cum(r.lengths)), r.lengths)]
        main = [p for p in pieces if p in encoded]
        assert len(main) >= 5
        replayed = [p for p in pieces if p and p not in encoded and p[0] != tok.pad_token_id]
        assert replayed and all(len(p) <= 24 for p in replayed)


def _cum(lengths):
    total = 0
    for n in lengths[:-1]:
        total += n
        yield total


def test_stage2_replay_fraction_and_determinism(tmp_path, tok):
    main = _jsonl(tmp_path / "m.jsonl", [f"main {i}" for i in range(200)])
    rep = _jsonl(tmp_path / "r.jsonl", [f"replay {i}" for i in range(200)])

    def run():
        s = PretrainStream(tok, [main], seq_len=128, replay_files=[rep], replay_fraction=0.25, replay_len=64, seed=3)
        return [s.next_row().ids for _ in range(30)], s.docs, s.replay.state_dict()
    a, b = run(), run()
    assert a[0] == b[0]
    n_replay = a[2]["line"] + a[2]["epoch"] * 200
    assert 0.15 < n_replay / a[1] < 0.35


@pytest.mark.parametrize("kind", ["stage1", "stage2", "sft"])
def test_stream_resume_is_exact(tmp_path, tok, kind):
    if kind == "sft":
        lines = [{"messages": [{"role": "user", "content": d[:20]}, {"role": "assistant", "content": d}]}
                 for d in _docs(15, seed=4, hi=20)]
        f = tmp_path / "sft.jsonl"
        f.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")

        def make():
            return SFTStream(tok, [str(f)], seq_len=160)
    else:
        files = [_jsonl(tmp_path / "a.jsonl", _docs(25, seed=5, hi=120)), _jsonl(tmp_path / "b.jsonl", _docs(7, 6))]

        def make():
            extra = dict(replay_files=files[1:], replay_fraction=0.5, replay_len=32) if kind == "stage2" else {}
            return PretrainStream(tok, files, seq_len=48, **extra)
    s = make()
    for _ in range(7):
        s.next_row()
    state = json.loads(json.dumps(s.state_dict()))  # survives serialisation
    expect = [s.next_row() for _ in range(20)]
    r = make()
    r.load_state_dict(state)
    assert [x.ids for x in (r.next_row() for _ in range(20))] == [x.ids for x in expect]


def test_packed_logits_equal_unpacked(tmp_path, ckpt, tok):
    """No token sees another document: each piece's logits in a packed row equal its own forward."""
    model = ExaoneForCausalLM.from_pretrained(ckpt).eval()
    s = PretrainStream(tok, [_jsonl(tmp_path / "a.jsonl", _docs(12, seed=7, hi=30))], seq_len=96)
    batch = collate([s.next_row(), s.next_row()])
    with torch.no_grad():
        packed = model(batch.input_ids, cu_seqlens=batch.cu_seqlens)[0]
        cu = batch.cu_seqlens.tolist()
        assert len(cu) > 4
        for a, b in zip(cu, cu[1:]):
            alone = model(batch.input_ids[:, a:b])[0]
            torch.testing.assert_close(packed[a:b], alone, atol=2e-5, rtol=1e-4)


def test_sft_loss_covers_assistant_replies_only(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"},
                {"role": "assistant", "content": "Hi there."}, {"role": "user", "content": "한국의 수도는?"},
                {"role": "assistant", "content": "서울입니다."}]
    ids, labels = encode_chat(tok, messages)
    assert tok.decode(ids) == tok.apply_chat_template(messages, add_generation_prompt=False)
    learnt = [labels[t] for t in range(len(ids)) if labels[t] != IGNORE_INDEX]
    text = tok.decode(learnt)
    assert text == "Hi there.[|endofturn|]서울입니다.[|endofturn|]"
    # labels are next tokens: learnt positions sit just before the reply tokens
    for t, lab in enumerate(labels):
        if lab != IGNORE_INDEX:
            assert ids[t + 1] == lab


def test_preference_rows_and_order(tmp_path, tok):
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in [
        {"prompt": "Capital of Korea?", "chosen": "Seoul.", "rejected": "Tokyo."},
        {"messages": [{"role": "user", "content": "안녕?"}], "chosen": [{"role": "assistant", "content": "안녕하세요!"}],
         "rejected": "몰라"}]) + "\n", encoding="utf-8")
    data = PreferenceData(tok, [str(f)], seed=1)
    pairs = data.next_pairs(4)
    assert sorted(i for i, _ in pairs[:2]) == [0, 1] and data.epoch == 1
    rows = preference_rows(pairs[:1])
    ex = pairs[0][1]
    for row, reply in zip(rows, (ex.chosen, ex.rejected)):
        assert [x for x in row.labels if x != IGNORE_INDEX] == reply
        assert reply[-1] == tok.eos_token_id


def test_shard_disjoint_and_complete():
    items = list(range(12))
    parts = [shard(items, r, 3) for r in range(3)]
    assert sorted(x for p in parts for x in p) == items
    with pytest.raises(ValueError, match="split evenly"):
        shard(items, 0, 5)


# ---------------------------------------------------------------- bad input
def test_bad_input_names_file_and_line(tmp_path, tok):
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        PretrainStream(tok, [str(tmp_path / "nope.jsonl")], seq_len=32)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": "broken\n', encoding="utf-8")
    s = PretrainStream(tok, [str(bad)], seq_len=32)
    with pytest.raises(DataError, match=r"bad.jsonl:3: malformed JSON"):
        for _ in range(3):
            s.next_row()
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"nofield.jsonl:1: no field 'text'"):
        PretrainStream(tok, [str(nofield)], seq_len=32).next_row()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="no documents"):
        PretrainStream(tok, [str(empty)], seq_len=32).next_row()
    with pytest.raises(DataError, match="longer than the model's context"):
        PretrainStream(tok, [str(bad)], seq_len=1024, max_len=512)


def test_bad_sft_and_preference_lines(tmp_path, tok):
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]})
                   + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"sft.jsonl:1: .*empty assistant response"):
        SFTStream(tok, [str(sft)], seq_len=64).next_row()
    long = tmp_path / "long.jsonl"
    long.write_text("\n" + json.dumps({"prompt": "hi", "response": " ".join(WORDS * 20)}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"long.jsonl:2: the conversation has \d+ tokens, longer than seq_len 64"):
        SFTStream(tok, [str(long)], seq_len=64, max_len=512).next_row()
    pref = tmp_path / "pref.jsonl"
    pref.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n"
                    + json.dumps({"prompt": "q", "chosen": "a", "rejected": ""}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"pref.jsonl:2: 'rejected' is an empty response"):
        PreferenceData(tok, [str(pref)])
    pref.write_text(json.dumps({"prompt": "q " * 600, "chosen": "a", "rejected": "b"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"pref.jsonl:1: prompt \+ response is \d+ tokens, longer than the model's"):
        PreferenceData(tok, [str(pref)], max_len=512)
