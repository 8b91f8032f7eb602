"""Decontamination: the compiled normaliser agrees with Python's definition, planted contamination
(copies, case / punctuation / spacing changes, Korean) is found and clean text kept, the compiled
pool gives exactly the plain-Python reference's results in both modes, results do not depend on
runs or threads, and the file tool writes clean files, removed examples and a report, with errors
that name the file and line."""
from __future__ import annotations

import json
import random

import pytest

from exaone_ext.cli import main as cli_main
from exaone_ext.data import DecontaminationPool, decontaminate, normalize
from exaone_ext.data.decontaminate import normalize_native
from exaone_ext.data.decontaminate_reference import ReferencePool, sample_offsets

KO_TEST = "대규모 언어 모델은 앞의 토큰으로부터 다음 토큰을 예측하며, 한국어와 영어 문장을 모두 이해하도록 학습되었습니다. 이 문장은 시험 문제로 사용됩니다."
EN_TEST = ("Which of the following best describes the function of mitochondria in eukaryotic cells, "
           "according to the standard model of cellular respiration?")


def random_unicode(rng: random.Random, n: int) -> str:
    """Characters from everywhere: ASCII, Latin-1, Greek (final sigma), Turkish dotted I, Hangul,
    CJK, fullwidth forms, combining marks, astral planes; no surrogates."""
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x130, 0x131), (0xAC00, 0xD7A3), (0x1100, 0x11FF),
              (0x3130, 0x318F), (0x4E00, 0x4E80), (0xFF00, 0xFF65), (0x300, 0x36F), (0x10400, 0x1044F),
              (0x1D400, 0x1D4FF), (0x0, 0xD7FF), (0xE000, 0x10FFFF)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def test_native_normalisation_matches_python():
    rng = random.Random(0)
    cases = ["", "ΑΣ ΣΑΣ", "İstanbul", "ǅ ǈ", "ＡＢＣ１２３", "Straße", "ﬁ", "한국어 ABC-def_123!", "٣٤٥", "Ⅻ ⅻ"]
    cases += [random_unicode(rng, rng.randint(1, 200)) for _ in range(400)]
    for text in cases:
        assert normalize_native(text) == normalize(text), repr(text)
        assert normalize_native(text.encode("utf-8")) == normalize(text)
    assert normalize("Hello, World! 안녕 하세요.") == "helloworld안녕하세요"


def _cpu_has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx2" in line for line in f)
    except OSError:
        return False


def test_vector_ascii_path_equals_table_path():
    """Runs of ASCII go 32 bytes at a time through the vector path where the CPU has AVX2: every
    ASCII byte (control characters and DEL included), non-ASCII characters landing at every offset
    of a block, runs ending at every length, and invalid UTF-8 after a vector block."""
    from exaone_ext import _C
    from exaone_ext.data.decontaminate import _normalizer, normalization_tables

    fast = _normalizer()
    slow = _C._TextNormalizer(*normalization_tables(), vectorize=False)
    assert not slow.vectorized
    if _cpu_has_avx2():
        assert fast.vectorized
    rng = random.Random(1)
    ascii_all = "".join(chr(c) for c in range(128))
    cases = [ascii_all * 3, ascii_all[::-1] * 2, "A" * 32, "a1" * 16 + "é", "é" + "Z9" * 40]
    others = ["é", "한", "ß", "İ", "\U0001D400", "ǅ", "Σ", "ﬁ"]
    for n in range(0, 130):
        s = "".join(rng.choice(ascii_all) for _ in range(n))
        cases.append(s)
        for _ in range(3):
            at = rng.randint(0, n)
            cases.append(s[:at] + rng.choice(others) + s[at:])
    for k in range(64):  # a non-ASCII character at every offset within and across two blocks
        cases.append("Ab3-" * 8 + "x" * k + rng.choice(others) + "Qz 9" * 12)
    for text in cases:
        want = normalize(text)
        assert slow.normalize(text) == want, repr(text)
        assert fast.normalize(text) == want, repr(text)
        assert fast.normalize(text.encode("utf-8")) == want, repr(text)
    for k in range(0, 70, 7):
        with pytest.raises(ValueError, match="not valid UTF-8"):
            fast.normalize(b"Abc, def." * 8 + b"x" * k + b"\xc3" + b"more text" * 5)


def test_custom_ascii_rule_keeps_the_table_path():
    """A table whose ASCII rule differs from str.isalnum / str.lower is honoured byte for byte."""
    from exaone_ext import _C
    from exaone_ext.data.decontaminate import normalization_tables

    table, extra = normalization_tables()
    t = bytearray(table)
    t[ord("-") * 4:ord("-") * 4 + 4] = (ord("-")).to_bytes(4, "little")  # keep '-'
    t[ord("Q") * 4:ord("Q") * 4 + 4] = (0).to_bytes(4, "little")         # drop 'Q'
    norm = _C._TextNormalizer(bytes(t), extra)
    assert not norm.vectorized
    text = "Quick-Quiet QUEUE-e " * 5
    assert norm.normalize(text) == text.replace("Q", "").replace(" ", "").lower()


def test_invalid_utf8_is_refused():
    with pytest.raises(ValueError, match="not valid UTF-8"):
        normalize_native(b"abc\xff")
    pool = DecontaminationPool({"b": [EN_TEST]}, window=20)
    with pytest.raises(ValueError, match=r"docs\[1\] is not valid UTF-8"):
        pool.check(["fine", b"\xed\xa0\x80 surrogate"])


@pytest.mark.parametrize("mode", ["sampled", "exhaustive"])
def test_planted_contamination_is_found(mode):
    rng = random.Random(1)
    filler = [" ".join(rng.choice(["alpha", "river", "stone", "green", "quiet", "market", "숲", "바다"])
                       for _ in range(rng.randint(5, 60))) for _ in range(200)]
    pool = DecontaminationPool({"en": filler[:50] + [EN_TEST], "ko": [KO_TEST]}, window=50)
    planted = [
        EN_TEST,                                                   # exact copy
        EN_TEST.upper(),                                           # case
        EN_TEST.replace(" ", "").replace(",", ";;"),               # spacing and punctuation
        "  ".join(EN_TEST.split()) + "!!!",
        "Intro text here. " + EN_TEST + " And more text after it.",  # embedded
        KO_TEST,
        KO_TEST.replace(" ", "\n").replace(",", " ..."),
        "문제: " + KO_TEST + " 정답은 무엇입니까",
    ]
    clean = ["The mitochondria is the powerhouse of the cell, a phrase every student learns early.",
             "대규모 언어 모델은 많은 데이터를 사용합니다. 오늘은 날씨가 좋습니다.",
             "Which of the following best describes the function of ribosomes in prokaryotes?"]
    got = pool.check(planted + clean, mode=mode, samples=10)
    for text, matches in zip(planted, got[:len(planted)]):
        assert matches, f"missed: {text!r}"
        assert matches[0].benchmark == ("ko" if any("\uac00" <= c <= "\ud7a3" for c in text) else "en")
    assert got[len(planted):] == [[], [], []]


def _reference_hits(ref: ReferencePool, docs, mode, samples):
    return [ref.check(d, mode, samples) for d in docs]


@pytest.mark.parametrize("mode", ["sampled", "exhaustive"])
def test_compiled_pool_equals_reference(mode):
    rng = random.Random(2)
    words = ["the", "cat", "sat", "on", "a", "mat", "고양이", "가", "매트", "위에", "앉았다", "ΣΟΦΙΑ", "İz", "42"]
    tests = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 30))) for _ in range(300)]
    groups = [rng.randrange(3) for _ in tests]
    docs = []
    for _ in range(400):
        parts = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 20)))]
        if rng.random() < 0.5:  # a piece of a test example, case and spacing changed
            t = rng.choice(tests)
            a = rng.randrange(len(t))
            parts.append(t[a:a + rng.randint(1, 120)].upper().replace(" ", "  "))
        parts.append(" ".join(rng.choice(words) for _ in range(rng.randint(0, 20))))
        docs.append(", ".join(parts))
    docs += tests[:20] + [""]
    window = 12
    ref = ReferencePool(tests, groups, window)
    by_group = {g: [t for t, gg in zip(tests, groups) if gg == g] for g in range(3)}
    pool = DecontaminationPool({f"b{g}": by_group[g] for g in range(3)}, window)
    # the reference indexes tests globally; map its answers to (benchmark, index within it)
    local = {}
    for g in range(3):
        idx = [i for i, gg in enumerate(groups) if gg == g]
        local.update({i: (f"b{g}", k) for k, i in enumerate(idx)})
    expected = [[(*local[t], off) for t, off in hits] for hits in _reference_hits(ref, docs, mode, 3)]
    got = [[(m.benchmark, m.test_index, m.offset) for m in ms] for ms in pool.check(docs, mode, samples=3)]
    assert got == expected
    assert sum(bool(x) for x in got) > 50  # the test exercises matches, not only clean text


def test_identical_across_runs_and_threads():
    rng = random.Random(3)
    tests = [random_unicode(rng, rng.randint(20, 300)) for _ in range(200)]
    docs = [random_unicode(rng, rng.randint(0, 400)) + rng.choice(tests)[:rng.randint(0, 200)] for _ in range(1500)]
    pool = DecontaminationPool({"t": tests}, window=30)
    for mode in ("sampled", "exhaustive"):
        first = pool.check(docs, mode, samples=5, threads=1)
        assert any(first)
        for threads in (2, 3, 7):
            assert pool.check(docs, mode, samples=5, threads=threads) == first
        assert DecontaminationPool({"t": tests}, window=30).check(docs, mode, samples=5, threads=2) == first


def test_sampling_is_seeded_by_content():
    norm = normalize(EN_TEST) * 3
    a = sample_offsets(norm, 50, 10)
    assert a == sample_offsets(norm, 50, 10) and len(a) == 10 and len(set(a)) > 5
    assert sample_offsets(norm + "x", 50, 10) != a
    assert sample_offsets("a" * 55, 50, 10) == list(range(6))  # few windows: all of them


def test_short_examples_compared_whole():
    pool = DecontaminationPool({"short": ["What is 2+2?", "Name the capital of France."],
                                "long": [EN_TEST]}, window=50)
    got = pool.check(["what is 2 + 2", "WHAT IS 2+2? Four.", "Name the capital of France!", "the capital of France",
                      "capital"], mode="exhaustive")
    assert [[m.benchmark for m in ms] for ms in got] == [["short"], [], ["short"], [], []]


def test_bad_arguments():
    with pytest.raises(ValueError, match="window"):
        DecontaminationPool({"a": ["x"]}, window=0)
    with pytest.raises(ValueError, match="tests"):
        DecontaminationPool({}, window=5)
    with pytest.raises(TypeError, match=r"tests\['a'\]\[1\]"):
        DecontaminationPool({"a": ["x", 3]})
    pool = DecontaminationPool({"a": ["x"]})
    with pytest.raises(ValueError, match="mode"):
        pool.check(["x"], mode="fast")
    with pytest.raises(ValueError, match="samples"):
        pool.check(["x"], samples=0)
    with pytest.raises(TypeError, match=r"docs\[0\]"):
        pool.check([3])


# ---------------------------------------------------------------------------- files and CLI
def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def files(tmp_path):
    tests = write_jsonl(tmp_path / "quiz.jsonl", [{"question": EN_TEST, "answer": "It produces ATP"},
                                                  {"question": KO_TEST, "answer": ["가", "나"]}])
    train = [{"text": "An unrelated sentence about gardens and rivers, long enough to have many windows.", "id": 0},
             {"text": "Copied: " + EN_TEST.lower().replace(",", ""), "id": 1},
             {"text": "무관한 문장입니다. 오늘은 공원에서 산책을 했습니다. 날씨가 맑았습니다.", "id": 2},
             {"text": KO_TEST.replace(" ", ""), "id": 3},
             {"text": "short one", "id": 4}]
    return tmp_path, tests, write_jsonl(tmp_path / "train.jsonl", train)


@pytest.mark.parametrize("mode", ["sampled", "exhaustive"])
def test_decontaminate_jsonl(files, mode):
    tmp, tests, train = files
    out = tmp / "out"
    report = decontaminate([train], [tests], out, test_fields=["question"], mode=mode, threads=2)
    kept = [json.loads(line)["id"] for line in (out / "train.jsonl").read_text().splitlines()]
    assert kept == [0, 2, 4]
    removed = [json.loads(line) for line in (out / "removed.jsonl").read_text().splitlines()]
    assert [(r["line"], r["benchmarks"]) for r in removed] == [(2, ["quiz"]), (4, ["quiz"])]
    saved = json.loads((out / "report.json").read_text())
    assert saved["removed"] == report["removed"] == 2 and saved["examples"] == 5
    b = saved["benchmarks"]["quiz"]
    assert b["matched_train_examples"] == 2 and b["test_examples"] == 2
    assert b["example"]["train_line"] == 2 and b["example"]["test_index"] == 0
    assert b["example"]["matched_text"] in normalize(EN_TEST)
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_decontaminate_text_lines_and_paragraphs(tmp_path):
    tests = write_jsonl(tmp_path / "t.jsonl", [{"q": EN_TEST}])
    lines = ["first clean line", "", EN_TEST.upper(), "last clean line"]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    decontaminate([tmp_path / "train.txt"], [tests], tmp_path / "o1", test_fields=["q"])
    assert (tmp_path / "o1" / "train.txt").read_text() == "first clean line\n\nlast clean line\n"
    paras = "para one\nstill one\n\n\nbefore " + EN_TEST + "\nafter\n\npara three\n"
    (tmp_path / "train.txt").write_text(paras, encoding="utf-8")
    report = decontaminate([tmp_path / "train.txt"], [tests], tmp_path / "o2", test_fields=["q"],
                           text_unit="paragraph")
    assert (tmp_path / "o2" / "train.txt").read_text() == "para one\nstill one\n\npara three\n"
    assert report["examples"] == 3 and report["removed"] == 1
    removed = json.loads((tmp_path / "o2" / "removed.jsonl").read_text())
    assert removed["line"] == 5 and removed["text"].startswith("before")


def test_decontaminate_errors_name_file_and_line(tmp_path):
    good_test = write_jsonl(tmp_path / "t.jsonl", [{"q": EN_TEST}])
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "hello"}, {"text": "world"}])
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"empty\.jsonl: empty training file"):
        decontaminate([tmp_path / "empty.jsonl"], [good_test], tmp_path / "o", test_fields=["q"])
    with pytest.raises(ValueError, match=r"empty\.jsonl: empty test set"):
        decontaminate([train], [tmp_path / "empty.jsonl"], tmp_path / "o", test_fields=["q"])
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": "broken"\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: malformed JSON"):
        decontaminate([tmp_path / "bad.jsonl"], [good_test], tmp_path / "o", test_fields=["q"])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: malformed JSON"):
        decontaminate([train], [tmp_path / "bad.jsonl"], tmp_path / "o", test_fields=["text"])
    with pytest.raises(ValueError, match=r"train\.jsonl:1: missing field 'body'"):
        decontaminate([train], [good_test], tmp_path / "o", test_fields=["q"], train_field="body")
    with pytest.raises(ValueError, match=r"t\.jsonl:1: missing field 'answer'"):
        decontaminate([train], [good_test], tmp_path / "o", test_fields=["q", "answer"])
    (tmp_path / "bin.txt").write_bytes(b"fine\nalso fine\nbad \xff byte\n")
    with pytest.raises(ValueError, match=r"bin\.txt:3: not valid UTF-8"):
        decontaminate([tmp_path / "bin.txt"], [good_test], tmp_path / "o", test_fields=["q"])
    assert not (tmp_path / "o" / "report.json").exists()  # nothing half-written


def test_cli_decontaminate(files, capsys):
    tmp, tests, train = files
    rc = cli_main(["decontaminate", "--train", str(train), "--test", f"bench={tests}", "--test-fields",
                   "question,answer", "--out", str(tmp / "cli"), "--mode", "exhaustive", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "bench" in out and "2 of 5 training examples removed" in out
    rc = cli_main(["decontaminate", "--train", str(train), "--test", str(tests), "--test-fields", "nope",
                   "--out", str(tmp / "cli2")])
    assert rc == 1 and "missing field 'nope'" in capsys.readouterr().err
