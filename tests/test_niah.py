"""Needle in a haystack with the tiny checkpoint: the haystack has the requested token length and
the needle sits at the requested depth on a sentence boundary, scoring is right on planted answers,
a small grid runs end to end (results, heat map, CLI) and an interrupted grid resumes without
redoing finished cells."""
from __future__ import annotations

import json

import pytest

from exaone_ext.cli import main as cli_main
from exaone_ext.eval import NiahConfig, NiahTask, build_haystack, filler_sentences, get_task, run_niah, score_answer
from exaone_ext.eval import niah as niah_module
from exaone_ext.generation import GenerationResult, GenerationStats
from exaone_ext.model import ExaoneForCausalLM
from exaone_ext.testing import write_tiny_checkpoint
from exaone_ext.tokenizer import ExaoneTokenizer

CONTEXT = 1024


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("niah") / "tiny", max_position_embeddings=CONTEXT)
    return path, ExaoneForCausalLM.from_pretrained(path), ExaoneTokenizer.from_pretrained(path)


def test_filler_is_varied_reproducible_and_digit_free():
    for lang in ("en", "ko"):
        a = [s for _, s in zip(range(300), filler_sentences(lang, seed=1))]
        assert a == [s for _, s in zip(range(300), filler_sentences(lang, seed=1))]
        assert a != [s for _, s in zip(range(300), filler_sentences(lang, seed=2))]
        assert len(set(a)) > 250 and not any(ch.isdigit() for s in a for ch in s)
        assert all(s.endswith(".") for s in a)
    ko = next(filler_sentences("ko", 0))
    assert any("\uac00" <= c <= "\ud7a3" for c in ko)
    with pytest.raises(ValueError, match="language"):
        next(filler_sentences("fr"))


@pytest.mark.parametrize("lang", ["en", "ko"])
@pytest.mark.parametrize("length", [300, 517, 1024])
def test_haystack_length_and_depth(tiny, lang, length):
    _, _, tok = tiny
    longest = max(len(tok.encode(" " + s)) for _, s in zip(range(400), filler_sentences(lang, 0)))
    for depth in (0, 10, 33.3, 50, 90, 100):
        hay = build_haystack(tok, lang, length, depth, seed=0, max_new_tokens=24)
        assert len(hay.prompt_ids) + 24 == length
        text = tok.decode(hay.prompt_ids)
        needle = tok.decode(hay.prompt_ids[hay.needle_start:hay.needle_end])
        assert hay.key in needle and text.count(hay.key) == 1
        # on a sentence boundary: the filler before the needle ends a sentence
        before = tok.decode(hay.prompt_ids[hay.start:hay.needle_start])
        assert hay.needle_start == hay.start or before.rstrip().endswith(".")
        # at the requested depth: the nearest sentence boundary, so within one filler sentence
        filler = hay.haystack_tokens - (hay.needle_end - hay.needle_start)
        assert abs(hay.depth - depth) * filler / 100 <= longest, (depth, hay.depth, longest)
    assert build_haystack(tok, lang, length, 0).needle_start == build_haystack(tok, lang, length, 0).start


def test_haystack_too_short_is_refused(tiny):
    _, _, tok = tiny
    with pytest.raises(ValueError, match="no room for filler"):
        build_haystack(tok, "en", 40, 50)


def test_scoring_on_planted_answers():
    assert score_answer("The code is 4831207.", "4831207")
    assert score_answer("4,831,207", "4831207") and score_answer("비밀 번호는 4 831 207입니다", "4831207")
    assert not score_answer("48312070", "4831207") and not score_answer("14831207", "4831207")
    assert not score_answer("4831208", "4831207") and not score_answer("", "4831207")
    assert not score_answer("I do not know.", "4831207")


def _planted_generate(calls):
    """Stands in for the model: answers with the code found in the prompt (checks the plumbing)."""
    def fake(model, tokenizer, prompt_ids, config, prefill_chunk_size=None):
        calls.append(len(prompt_ids))
        text = tokenizer.decode(prompt_ids)
        code = next(w for w in text.replace(".", " ").replace("입니다", " ").split() if w.isdigit() and len(w) == 7)
        return GenerationResult(tokens=[], text=f"The code is {code}.", stop_reason="stop_token",
                                prompt_tokens=len(prompt_ids), stats=GenerationStats())
    return fake


def test_grid_end_to_end_with_tiny_model(tiny, tmp_path):
    _, model, tok = tiny
    config = NiahConfig(lengths=[320, 384], depths=[0, 100], languages=["en", "ko"], max_new_tokens=4,
                        prefill_chunk_size=160)  # several chunks per prompt
    cells = run_niah(model, tok, config, tmp_path, model_name="tiny")
    assert len(cells) == 8
    assert {(c["language"], c["length"], c["depth"]) for c in cells} == {
        (lang, n, d) for lang in ("en", "ko") for n in (320, 384) for d in (0, 100)}
    for c in cells:
        assert c["prompt_tokens"] + 4 == c["length"]
        assert c["correct"] == score_answer(c["answer"], c["key"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["cells"] == cells
    assert (tmp_path / "results.csv").read_text().count("\n") == 9
    assert (tmp_path / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_planted_answers_score_full_and_resume(tiny, tmp_path, monkeypatch):
    _, model, tok = tiny
    calls = []
    fake = _planted_generate(calls)
    monkeypatch.setattr(niah_module, "generate", fake)
    config = NiahConfig(lengths=[400, 800], depths=[0, 25, 75, 100], languages=["en", "ko"], max_new_tokens=8)

    def interrupt_after_five(*args, **kwargs):
        if len(calls) == 5:
            raise KeyboardInterrupt
        return fake(*args, **kwargs)

    monkeypatch.setattr(niah_module, "generate", interrupt_after_five)
    with pytest.raises(KeyboardInterrupt):
        run_niah(model, tok, config, tmp_path)
    assert len(json.loads((tmp_path / "results.json").read_text())["cells"]) == 5
    monkeypatch.setattr(niah_module, "generate", fake)
    cells = run_niah(model, tok, config, tmp_path)
    assert len(calls) == 16 and len(cells) == 16  # 5 before the interruption + the 11 left, none twice
    assert all(c["correct"] for c in cells)
    run_niah(model, tok, config, tmp_path)
    assert len(calls) == 16  # everything done: nothing runs
    with pytest.raises(ValueError, match="other settings.*seed"):
        run_niah(model, tok, NiahConfig(lengths=[400, 800], depths=[0, 25, 75, 100], max_new_tokens=8, seed=1),
                 tmp_path)


def test_bad_config(tiny):
    _, model, tok = tiny
    with pytest.raises(ValueError, match="depths"):
        NiahConfig(depths=[120])
    with pytest.raises(ValueError, match="languages"):
        NiahConfig(languages=["fr"])
    with pytest.raises(ValueError, match="exceed the model's context"):
        run_niah(model, tok, NiahConfig(lengths=[4096]), "unused")


def test_cli_niah(tiny, tmp_path, capsys):
    path, _, _ = tiny
    rc = cli_main(["niah", "--model", str(path), "--out", str(tmp_path), "--lengths", "320,384",
                   "--depths", "0,100", "--languages", "ko", "--max-new-tokens", "4", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["lang", "320", "384", "all"]
    assert len(json.loads((tmp_path / "results.json").read_text())["cells"]) == 4
    assert cli_main(["niah", "--model", str(path), "--out", str(tmp_path), "--lengths", "1k,x"]) == 1
    assert "--lengths" in capsys.readouterr().err


# ---------------------------------------------------------------------------- tasks
@pytest.mark.parametrize("lang", ["en", "ko"])
def test_needle_is_spaced_like_a_sentence(tiny, lang):
    """The needle sits one space from its neighbours, as the filler sentences do from each other
    (nothing about its spacing gives it away), and opens the haystack without a leading space."""
    _, _, tok = tiny
    for depth in (0, 40, 100):
        hay = build_haystack(tok, lang, 700, depth, seed=3, max_new_tokens=8)
        text = tok.decode(hay.prompt_ids[hay.start:hay.end])
        needle = tok.decode(hay.prompt_ids[hay.needle_start:hay.needle_end])
        assert "  " not in text and not text.startswith(" ")
        assert needle.startswith(" ") == (depth != 0) and hay.key in needle
        if depth == 0:
            assert text.startswith(needle) and text[len(needle)] == " "


def test_word_keys_and_prefix_matching():
    assert score_answer("Red.", "red", "prefix") and score_answer(" red and blue", "red", "prefix")
    assert score_answer("The secret color is RED", "red") and not score_answer("The secret color is red", "red", "prefix")
    assert not score_answer("reddish", "red") and not score_answer("infrared", "red")
    assert score_answer("빨강입니다.", "빨강", "prefix") and not score_answer("파랑", "빨강")
    assert score_answer("4 831 207 it is", "4831207", "prefix") and not score_answer("no: 4831207", "4831207", "prefix")
    with pytest.raises(ValueError, match="match"):
        score_answer("x", "x", "exact")


def _write_task(tmp_path, **overrides):
    (tmp_path / "en.txt").write_text("The tide came in slowly. Gulls circled the pier!\nA boat waited by the dock? "
                                     "Fog rolled over the bay.\n", encoding="utf-8")
    task = {"needle": {"en": "The password of {topic} is {key}."},
            "question": {"en": "\nQuestion: what is the password of {topic}? Answer:"},
            "instruction": {"en": "Harbour notes.\n"},
            "keys": {"en": ["amber", "cobalt", "maroon"]}, "topics": {"en": ["Ada", "Bo"]},
            "chat": False, "match": "prefix", "filler": {"en": "en.txt"}}
    task.update(overrides)
    path = tmp_path / "task.json"
    path.write_text(json.dumps(task), encoding="utf-8")
    return path


def test_task_from_json_raw_prompt_and_file_filler(tiny, tmp_path):
    _, _, tok = tiny
    task = get_task(_write_task(tmp_path))
    assert task.name == "task" and task.languages == ("en",) and not task.chat
    hay = build_haystack(tok, "en", 260, 50, seed=0, max_new_tokens=4, task=task)
    assert len(hay.prompt_ids) + 4 == 260
    text = tok.decode(hay.prompt_ids)
    assert text.startswith("Harbour notes.\n") and "[|user|]" not in text  # raw text, no chat format
    needle = tok.decode(hay.prompt_ids[hay.needle_start:hay.needle_end]).strip()
    topic = needle.split()[3]
    assert hay.key in ("amber", "cobalt", "maroon") and needle == f"The password of {topic} is {hay.key}."
    assert text.endswith(f"\nQuestion: what is the password of {topic}? Answer:")
    filler = tok.decode(hay.prompt_ids[hay.start:hay.needle_start]) + tok.decode(hay.prompt_ids[hay.needle_end:hay.end])
    sentences = {"The tide came in slowly.", "Gulls circled the pier!", "A boat waited by the dock?",
                 "Fog rolled over the bay."}
    words = set(" ".join(sentences).split())
    assert set(filler.split()[:-1]) <= words  # the last sentence is cut short
    config = NiahConfig(lengths=[200], depths=[0, 100], task=task, max_new_tokens=4)
    assert config.languages == ["en"] and config.settings()["task"]["filler"] == "files: en=en.txt"


def test_secret_colour_task_scores_planted_answers(tiny, tmp_path, monkeypatch):
    """The demo model's task end to end with answers planted from the prompt (the plumbing of its
    per-language keys and raw prompts), and a run of another task refused in the same directory."""
    _, model, tok = tiny
    from exaone_ext.demo_model.world import COLORS

    colours = [c for pair in COLORS for c in pair]

    def fake(model, tokenizer, prompt_ids, config, prefill_chunk_size=None):
        text = tokenizer.decode(prompt_ids)
        assert "[|user|]" not in text and text.rstrip().endswith(("Answer:", "답:"))
        said = [c for c in colours if f"color is {c}." in text or f"색깔은 {c}입니다" in text]
        assert len(said) == 1
        return GenerationResult(tokens=[], text=f" {said[0]}", stop_reason="length",
                                prompt_tokens=len(prompt_ids), stats=GenerationStats())

    monkeypatch.setattr(niah_module, "generate", fake)
    config = NiahConfig(lengths=[256, 512], depths=[0, 50, 100], task="secret-colour", max_new_tokens=4)
    cells = run_niah(model, tok, config, tmp_path)
    assert len(cells) == 12 and all(c["correct"] for c in cells)
    assert {c["key"] for c in cells if c["language"] == "ko"} <= {c[1] for c in COLORS}
    with pytest.raises(ValueError, match="other settings.*task"):
        run_niah(model, tok, NiahConfig(lengths=[256, 512], depths=[0, 50, 100], max_new_tokens=4), tmp_path)


def test_bad_tasks(tmp_path):
    base = {"needle": {"en": "It is {key}."}, "question": {"en": "What is it?"}}
    with pytest.raises(ValueError, match=r"needle\['en'\]: must hold"):
        NiahTask(name="t", needle={"en": "no key"}, question={"en": "q"})
    with pytest.raises(ValueError, match="only {key} and {topic}"):
        NiahTask(name="t", needle={"en": "{key} of {name}"}, question={"en": "q"})
    with pytest.raises(ValueError, match="keys: expected one entry per language"):
        NiahTask(name="t", keys={"ko": ["a"]}, **base)
    with pytest.raises(ValueError, match=r"keys\['en'\]: expected a non-empty list"):
        NiahTask(name="t", keys={"en": []}, **base)
    with pytest.raises(ValueError, match="no topics"):
        NiahTask(name="t", needle={"en": "{topic}: {key}"}, question={"en": "q"})
    with pytest.raises(ValueError, match="match"):
        NiahTask(name="t", match="exact", **base)
    with pytest.raises(ValueError, match=r"unknown fields \['needles'\]"):
        get_task(_write_task(tmp_path, needles={}))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        get_task(_write_task(tmp_path, filler={"en": "missing.txt"}))
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        get_task(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="expected 'code', 'secret-colour' or a JSON file"):
        get_task("nope")
    with pytest.raises(ValueError, match=r"languages: task 'task' has \['en'\], got 'ko'"):
        NiahConfig(task=get_task(_write_task(tmp_path)), languages=["ko"])


def test_cli_niah_task_and_filler(tiny, tmp_path, capsys):
    path, _, _ = tiny
    (tmp_path / "ko.txt").write_text("바다는 조용했다. 배가 천천히 들어왔다.\n", encoding="utf-8")
    out = tmp_path / "run"
    rc = cli_main(["niah", "--model", str(path), "--out", str(out), "--lengths", "300", "--depths", "0,100",
                   "--task", "secret-colour", "--filler", f"ko={tmp_path / 'ko.txt'}", "--languages", "ko",
                   "--max-new-tokens", "3", "--no-progress"])
    assert rc == 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["task"]["name"] == "secret-colour"
    assert saved["settings"]["task"]["filler"].startswith("files: ko=")
    assert [c["language"] for c in saved["cells"]] == ["ko", "ko"]
    capsys.readouterr()
    assert cli_main(["niah", "--model", str(path), "--out", str(out), "--filler", f"en={tmp_path / 'ko.txt'}"]) == 1
    assert "--filler: no file for ko" in capsys.readouterr().err
    assert cli_main(["niah", "--model", str(path), "--out", str(out), "--filler", "en"]) == 1
    assert "expected LANG=FILE" in capsys.readouterr().err


def test_tasks_with_one_name_keep_their_own_filler(tiny):
    """Encoded filler is cached per filler, not per task name: two tasks named alike with different
    fillers each get their own sentences, and a Python filler is named in the saved settings."""
    _, _, tok = tiny

    def waves(lang, seed):
        while True:
            yield "The waves were calm."

    def hills(lang, seed):
        while True:
            yield "The hills were green."

    base = {"needle": {"en": "The code is {key}."}, "question": {"en": "\nCode:"}, "chat": False}
    texts = []
    for fn in (waves, hills):
        task = NiahTask(name="same", filler=fn, **base)
        assert task.describe()["filler"] == f"custom: {fn.__qualname__}"
        hay = build_haystack(tok, "en", 120, 50, task=task, max_new_tokens=4)
        texts.append(tok.decode(hay.prompt_ids[hay.start:hay.needle_start]))
    assert "waves" in texts[0] and "hills" not in texts[0]
    assert "hills" in texts[1] and "waves" not in texts[1]
