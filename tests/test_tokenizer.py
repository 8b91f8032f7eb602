"""Tokenizer, EXAONE chat format and UTF-8-safe streaming detokenisation, on a real byte-level BPE
trained by exaone_ext.testing (English + Korean, EXAONE's special tokens)."""
from __future__ import annotations

import json
import random

import jinja2
import pytest

from exaone_ext.testing import write_tiny_tokenizer
from exaone_ext.tokenizer import EXAONE_CHAT_TEMPLATE, ExaoneTokenizer, StreamDecoder, format_chat

# The chat template stored in EXAONE 3.5's tokenizer_config.json, as embedded (converted from
# that file) in the official EXAONE-3.5-7.8B-Instruct GGUF metadata. Kept here verbatim,
# independently of the package's copy, as the oracle.
HF_EXAONE_35_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '[|system|][|endofturn|]\n' }}{% endif %}{{ '[|' + message['role'] + '|]' + message['content'] }}"
    "{% if message['role'] == 'user' %}{{ '\n' }}{% else %}{{ '[|endofturn|]\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
)

ENGLISH = "Hello, how are you today? The capital of Korea is Seoul."
KOREAN = "안녕하세요. 한국의 수도는 서울입니다. 감사합니다!"
MIXED = "EXAONE은 한국어와 English를 모두 잘 합니다 🙂 (emoji, 4 bytes) — ñ é 漢字 끝."


def render_hf(template: str, messages, add_generation_prompt: bool) -> str:
    # As transformers renders chat templates: trim_blocks and lstrip_blocks on.
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            bos_token="[BOS]", eos_token="[|endofturn|]")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tok"))


@pytest.fixture(scope="module")
def tok(tok_dir):
    return ExaoneTokenizer.from_pretrained(tok_dir)


CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are EXAONE model from LG AI Research, a helpful assistant."},
     {"role": "user", "content": "안녕하세요?"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "그리고 3+3은?"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": ""}],
    [{"role": "system", "content": "sys"}, {"role": "user", "content": "a\nb"},
     {"role": "assistant", "content": "  spaced  "}, {"role": "user", "content": "[|endofturn|] inside"},
     {"role": "assistant", "content": "네"}],
    [{"role": "assistant", "content": "I start."}],
    [],
]


def test_package_template_is_the_exaone_template():
    assert EXAONE_CHAT_TEMPLATE == HF_EXAONE_35_TEMPLATE


@pytest.mark.parametrize("conv", CONVERSATIONS, ids=range(len(CONVERSATIONS)))
@pytest.mark.parametrize("gen_prompt", [True, False])
def test_chat_format_matches_jinja_template(tok, conv, gen_prompt):
    expected = render_hf(HF_EXAONE_35_TEMPLATE, conv, gen_prompt)
    assert format_chat(conv, gen_prompt) == expected
    assert tok.apply_chat_template(conv, add_generation_prompt=gen_prompt) == expected


def test_chat_format_documented_shape(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "[|system|][|endofturn|]\n[|user|]hi\n[|assistant|]"
    text = tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                                    {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}])
    assert text == "[|system|]S[|endofturn|]\n[|user|]U\n[|assistant|]A[|endofturn|]\n[|user|]V\n[|assistant|]"


def test_chat_template_random_conversations(tok):
    rng = random.Random(0)
    words = ["hello", "안녕", "\n", " ", "{{ x }}", "'quote'", "서울", "[|user|]", "ok"]
    for _ in range(50):
        conv = []
        if rng.random() < 0.5:
            conv.append({"role": "system", "content": "".join(rng.choices(words, k=rng.randint(0, 4)))})
        for j in range(rng.randint(1, 6)):
            conv.append({"role": "user" if j % 2 == 0 else "assistant",
                         "content": "".join(rng.choices(words, k=rng.randint(0, 5)))})
        gp = rng.random() < 0.5
        assert tok.apply_chat_template(conv, add_generation_prompt=gp) == render_hf(HF_EXAONE_35_TEMPLATE, conv, gp)


def test_chat_template_tokenized_has_no_bos_and_endofturn_is_special(tok):
    ids = tok.apply_chat_template([{"role": "user", "content": "안녕"}], tokenize=True)
    assert ids[0] != tok.bos_token_id
    assert ids.count(tok.eos_token_id) == 1  # the empty system turn's [|endofturn|], as one token
    assert tok.decode(ids) == "[|system|][|endofturn|]\n[|user|]안녕\n[|assistant|]"
    # Role tags are plain text: several ordinary tokens, not special ones.
    tag = tok.encode("[|user|]")
    assert len(tag) > 1 and not set(tag) & tok.special_ids


def test_matches_transformers_chat_template(tok_dir, tok):
    import transformers  # a test dependency: its absence fails
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    for conv in CONVERSATIONS[:-1]:
        assert tok.apply_chat_template(conv) == hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    for text in (ENGLISH, KOREAN, MIXED):
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False)


def test_special_tokens_read_from_files(tok_dir, tok):
    vocab = json.loads((tok_dir / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in vocab}
    assert tok.eos_token == "[|endofturn|]" and tok.eos_token_id == ids["[|endofturn|]"]
    assert tok.bos_token_id == ids["[BOS]"] and tok.pad_token_id == ids["[PAD]"] and tok.unk_token_id == ids["[UNK]"]
    assert tok.eos_token_id != 361  # the tiny vocabulary numbers differ from real EXAONE's
    assert {tok.eos_token_id, tok.bos_token_id, tok.pad_token_id, tok.unk_token_id} <= tok.special_ids


def test_special_tokens_from_config_json_only(tmp_path, tok_dir):
    # Without tokenizer_config.json / special_tokens_map.json, ids come from config.json.
    (tmp_path / "tokenizer.json").write_text((tok_dir / "tokenizer.json").read_text())
    ref = ExaoneTokenizer.from_pretrained(tok_dir)
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": ref.bos_token_id, "pad_token_id": ref.pad_token_id}))
    t = ExaoneTokenizer.from_pretrained(tmp_path)
    assert t.eos_token_id == ref.bos_token_id and t.eos_token == "[BOS]"
    assert t.chat_template is None
    assert t.apply_chat_template([{"role": "user", "content": "x"}]) == "[|system|][|endofturn|]\n[|user|]x\n[|assistant|]"


def test_custom_checkpoint_template_is_rendered(tmp_path):
    custom = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}" \
             "{% if add_generation_prompt %}<assistant>{% endif %}"
    t = ExaoneTokenizer.from_pretrained(write_tiny_tokenizer(tmp_path, chat_template=custom))
    assert t.apply_chat_template([{"role": "user", "content": "hi"}]) == "<user>hi[|endofturn|]<assistant>"


@pytest.mark.parametrize("text", [ENGLISH, KOREAN, MIXED, "", " leading space", "trailing\n\n"])
def test_encode_decode_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, ENGLISH]) == [ids, tok.encode(ENGLISH)]


def test_korean_splits_inside_characters(tok):
    # The tiny vocabulary must split some syllables over several tokens, or the streaming tests
    # below would not exercise partial characters.
    ids = tok.encode(MIXED + KOREAN)
    partial = [i for i in ids if tok.token_bytes(i) and not _valid_utf8(tok.token_bytes(i))]
    assert partial, "no token ends inside a multi-byte character"


def _valid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@pytest.mark.parametrize("text", [ENGLISH, KOREAN, MIXED])
def test_stream_decoder_reassembles_and_never_splits(tok, text):
    ids = tok.encode(text)
    dec = tok.stream_decoder()
    pieces = [dec.add(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    # Every piece is whole characters: re-encoding it to UTF-8 and decoding strictly works, and
    # the emitted prefix after each token is a prefix of the full text.
    out = ""
    for p in pieces:
        p.encode("utf-8").decode("utf-8", errors="strict")
        out += p
        assert text.startswith(out)


def test_stream_decoder_skips_special_tokens(tok):
    ids = tok.encode("안녕[|endofturn|]hi")
    assert tok.eos_token_id in ids
    dec = tok.stream_decoder(skip_special_tokens=True)
    assert dec.add_many(ids) + dec.flush() == tok.decode(ids, skip_special_tokens=True) == "안녕hi"
    dec = tok.stream_decoder(skip_special_tokens=False)
    assert dec.add_many(ids) + dec.flush() == "안녕[|endofturn|]hi"


def test_stream_decoder_random_ids_match_decode(tok):
    # Arbitrary id sequences (including invalid UTF-8) reassemble to what decode() returns.
    rng = random.Random(1)
    for _ in range(30):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 40))]
        dec = tok.stream_decoder(skip_special_tokens=True)
        assert dec.add_many(ids) + dec.flush() == tok.decode(ids, skip_special_tokens=True)


def test_stream_decoder_generic_path(tok):
    # The fallback for tokenizers that are not byte-level: sliding-window decode.
    dec = StreamDecoder(tok)
    dec._table = None
    ids = tok.encode(MIXED)
    pieces = [dec.add(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == MIXED
    assert not any("\ufffd" in p for p in pieces)


def test_errors(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        ExaoneTokenizer.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        ExaoneTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        ExaoneTokenizer.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="text"):
        tok.encode(123)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="negative"):
        tok.stream_decoder().add(-1)
    assert tok.stream_decoder().add(tok.vocab_size + 5) == ""  # e.g. padding rows of a model's embedding
    with pytest.raises(TypeError, match="messages"):
        tok.apply_chat_template("hello")
    with pytest.raises(ValueError, match=r"messages\[0\]: missing key 'content'"):
        tok.apply_chat_template([{"role": "user"}])
    with pytest.raises(TypeError, match=r"messages\[1\]\['content'\]"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "assistant", "content": None}])
