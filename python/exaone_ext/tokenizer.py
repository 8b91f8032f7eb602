"""EXAONE 3.5 tokenizer and chat format.

The tokenizer is the checkpoint's own `tokenizer.json` (byte-level BPE) run by Hugging Face
`tokenizers`; the special tokens and their ids come from the checkpoint's files
(tokenizer_config.json, special_tokens_map.json, config.json), never from constants here.

    tok = ExaoneTokenizer.from_pretrained("EXAONE-3.5-2.4B-Instruct")
    text = tok.apply_chat_template([{"role": "user", "content": "안녕하세요"}])
    ids = tok.encode(text)
    decoder = tok.stream_decoder()           # incremental, never splits a UTF-8 character
    pieces = [decoder.add(i) for i in ids] + [decoder.flush()]

Chat format (no BOS; role tags are plain text, only `[|endofturn|]` is a special token):

    [|system|]{system}[|endofturn|]\\n[|user|]{user}\\n[|assistant|]{answer}[|endofturn|]\\n ... [|assistant|]

With no system message an empty `[|system|][|endofturn|]\\n` turn is still written.
"""
from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer

__all__ = ["ExaoneTokenizer", "StreamDecoder", "EXAONE_CHAT_TEMPLATE", "format_chat"]

# The chat template that EXAONE 3.5 checkpoints carry in tokenizer_config.json. `format_chat` is
# the same format in plain Python; a checkpoint with any other template gets it rendered with jinja2.
EXAONE_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}{{ '[|system|][|endofturn|]\n' }}{% endif %}"
    "{{ '[|' + message['role'] + '|]' + message['content'] }}"
    "{% if message['role'] == 'user' %}{{ '\n' }}{% else %}{{ '[|endofturn|]\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
)

_END_OF_TURN = "[|endofturn|]"
# Special-token names of EXAONE 3.5, used only when a checkpoint's files do not name them.
_DEFAULT_SPECIAL = {"eos": "[|endofturn|]", "bos": "[BOS]", "pad": "[PAD]", "unk": "[UNK]"}


def _check_messages(messages) -> list[Mapping]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(
            f"messages: expected a list of {{'role': str, 'content': str}} dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TypeError(f"messages[{i}]: expected a dict with 'role' and 'content', got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise ValueError(f"messages[{i}]: missing key {key!r} (has {sorted(m)})")
            if not isinstance(m[key], str):
                raise TypeError(f"messages[{i}][{key!r}]: expected str, got {type(m[key]).__name__}")
        if not m["role"]:
            raise ValueError(f"messages[{i}]['role']: must not be empty")
    return list(messages)


def format_chat(messages: Sequence[Mapping], add_generation_prompt: bool = True) -> str:
    """EXAONE 3.5's chat format in plain Python: exactly what EXAONE_CHAT_TEMPLATE renders."""
    messages = _check_messages(messages)
    parts: list[str] = []
    for i, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if i == 0 and role != "system":
            parts.append("[|system|]" + _END_OF_TURN + "\n")
        parts.append(f"[|{role}|]{content}")
        parts.append("\n" if role == "user" else _END_OF_TURN + "\n")
    if add_generation_prompt:
        parts.append("[|assistant|]")
    return "".join(parts)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_content(value) -> str | None:
    """A special token as tokenizer_config.json / special_tokens_map.json write it: a string or
    an AddedToken dict with 'content'."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (GPT-2's alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class ExaoneTokenizer:
    """A `tokenizers.Tokenizer` plus EXAONE's special tokens and chat format.

    Attributes: eos_token / bos_token / pad_token / unk_token (strings or None) and their *_id,
    vocab_size, chat_template (the checkpoint's template string, or None)."""

    def __init__(self, tokenizer: Tokenizer, *, eos_token: str | None = _DEFAULT_SPECIAL["eos"],
                 bos_token: str | None = _DEFAULT_SPECIAL["bos"], pad_token: str | None = _DEFAULT_SPECIAL["pad"],
                 unk_token: str | None = _DEFAULT_SPECIAL["unk"], chat_template: str | None = None,
                 eos_token_id: int | None = None):
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"tokenizer: expected tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        self._tok = tokenizer
        self.chat_template = chat_template
        self.eos_token, self.bos_token, self.pad_token, self.unk_token = eos_token, bos_token, pad_token, unk_token
        self.bos_token_id = self._id_of(bos_token)
        self.pad_token_id = self._id_of(pad_token)
        self.unk_token_id = self._id_of(unk_token)
        self.eos_token_id = self._id_of(eos_token)
        if self.eos_token_id is None and eos_token_id is not None:
            self.eos_token_id, self.eos_token = eos_token_id, tokenizer.id_to_token(eos_token_id)
        if self.eos_token_id is None:
            raise ValueError(
                f"eos_token: {eos_token!r} is not in the vocabulary and no eos_token_id was given; "
                "generation would never stop at the end of a turn")
        added = tokenizer.get_added_tokens_decoder() if hasattr(tokenizer, "get_added_tokens_decoder") else {}
        self.special_ids: frozenset[int] = frozenset(
            [i for i, t in added.items() if getattr(t, "special", False)]
            + [i for i in (self.eos_token_id, self.bos_token_id, self.pad_token_id, self.unk_token_id) if i is not None])
        self._use_native_chat = chat_template is None or chat_template.strip() == EXAONE_CHAT_TEMPLATE

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ExaoneTokenizer":
        """Load from a checkpoint directory holding tokenizer.json and, optionally,
        tokenizer_config.json / special_tokens_map.json / config.json (for token names and ids),
        or from a GGUF file (see from_gguf)."""
        from .model.gguf import is_gguf_path
        if is_gguf_path(path):
            return cls.from_gguf(path)
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer path {str(path)!r} is not a directory")
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{tok_file}: missing (the tokenizer needs the checkpoint's tokenizer.json)")
        try:
            tokenizer = Tokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"{tok_file}: not a valid tokenizers file ({e})") from e
        tok_config = _read_json(path / "tokenizer_config.json")
        special_map = _read_json(path / "special_tokens_map.json")
        model_config = _read_json(path / "config.json")
        names = {}
        for kind, default in _DEFAULT_SPECIAL.items():
            key = f"{kind}_token"
            name = _token_content(tok_config.get(key)) or _token_content(special_map.get(key))
            if name is None:  # fall back to the id in config.json, then to EXAONE's name
                tid = model_config.get(f"{kind}_token_id")
                if isinstance(tid, list):
                    tid = tid[0] if tid else None
                name = tokenizer.id_to_token(tid) if isinstance(tid, int) else None
            names[key] = name if name is not None else (default if tokenizer.token_to_id(default) is not None else None)
        eos_id = model_config.get("eos_token_id")
        if isinstance(eos_id, list):
            eos_id = eos_id[0] if eos_id else None
        template = tok_config.get("chat_template")
        if isinstance(template, list):  # the named-templates form: [{"name": "default", "template": ...}]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if template is None and (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(tokenizer, chat_template=template, eos_token_id=eos_id if isinstance(eos_id, int) else None,
                   **names)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> "ExaoneTokenizer":
        """The tokenizer a GGUF file carries in its tokenizer.* metadata (byte-level BPE: tokens,
        merges, token types, special token ids, chat template); see exaone_ext.model.gguf."""
        from .model.gguf import gguf_tokenizer
        return gguf_tokenizer(path)

    def save_pretrained(self, path: str | os.PathLike) -> list[str]:
        """Write tokenizer.json, tokenizer_config.json (special tokens, chat template) and
        special_tokens_map.json into the directory `path`, which from_pretrained reads back.
        Returns the paths written."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        special = {f"{kind}_token": getattr(self, f"{kind}_token") for kind in ("bos", "eos", "pad", "unk")}
        special = {k: v for k, v in special.items() if v is not None}
        config = {"tokenizer_class": "GPT2Tokenizer", "add_bos_token": False, "clean_up_tokenization_spaces": False,
                  **special}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        files = [path / "tokenizer.json", path / "tokenizer_config.json", path / "special_tokens_map.json"]
        self._tok.save(str(files[0]))
        files[1].write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        files[2].write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return [str(f) for f in files]

    # ---------------------------------------------------------------- basics
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> Tokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._tok

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (e.g. `[|endofturn|]`) become
        their ids. add_special_tokens applies tokenizer.json's post-processor (off by default:
        EXAONE's prompts carry no BOS)."""
        if not isinstance(text, str):
            raise TypeError(f"text: expected str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}]: expected str, got {type(t).__name__}")
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def _check_ids(self, ids) -> list[int]:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = list(ids)
        vocab = self.vocab_size
        for i, t in enumerate(ids):
            if not isinstance(t, int) or isinstance(t, bool):
                raise TypeError(f"ids[{i}]: expected int, got {type(t).__name__}")
            if not 0 <= t < vocab:
                raise ValueError(f"ids[{i}]: token id {t} is outside the vocabulary [0, {vocab})")
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = self._check_ids(ids)
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"ExaoneTokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r}:{self.eos_token_id}, "
                f"bos={self.bos_token!r}:{self.bos_token_id}, pad={self.pad_token!r}:{self.pad_token_id})")

    # ---------------------------------------------------------------- chat
    def apply_chat_template(self, messages: Sequence[Mapping], add_generation_prompt: bool = True,
                            tokenize: bool = False) -> str | list[int]:
        """The conversation in EXAONE's chat format (text, or token ids with tokenize=True).

        messages: [{"role": "system" | "user" | "assistant", "content": str}, ...]. A checkpoint
        whose tokenizer_config.json carries a different chat template gets that template rendered."""
        if self._use_native_chat:
            text = format_chat(messages, add_generation_prompt)
        else:
            text = self._render_template(_check_messages(messages), add_generation_prompt)
        return self.encode(text) if tokenize else text

    @cached_property
    def _compiled_template(self):
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template)

    def _render_template(self, messages, add_generation_prompt: bool) -> str:
        return self._compiled_template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
            eos_token=self.eos_token or "", pad_token=self.pad_token or "", unk_token=self.unk_token or "")

    # ---------------------------------------------------------------- streaming
    @cached_property
    def _byte_table(self) -> list[bytes] | None:
        """Raw bytes of every token id when the tokenizer is byte-level (EXAONE's is), else None."""
        decoder = json.loads(self._tok.to_str()).get("decoder") or {}
        kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", []) or []}
        if "ByteLevel" not in kinds or len(kinds - {None, "Sequence"}) != 1:
            return None
        char_to_byte = {c: b for b, c in _bytes_to_unicode().items()}
        table: list[bytes] = [b""] * self.vocab_size
        added = self._tok.get_added_tokens_decoder()
        for token, i in self._tok.get_vocab(with_added_tokens=True).items():
            if i in added:
                table[i] = added[i].content.encode("utf-8")
            else:
                try:
                    table[i] = bytes(char_to_byte[c] for c in token)
                except KeyError:  # a non byte-level entry: fall back to the generic decoder
                    return None
        return table

    def token_bytes(self, token_id: int) -> bytes | None:
        """The raw UTF-8 bytes a byte-level token stands for (None for non byte-level tokenizers)."""
        table = self._byte_table
        return None if table is None else table[token_id]

    def stream_decoder(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)


class StreamDecoder:
    """Turns token ids, one at a time, into text pieces that never split a UTF-8 character.

    For a byte-level tokenizer the token bytes go through an incremental UTF-8 decoder, so a
    Korean syllable split over two tokens is emitted whole once its last byte arrives. The pieces
    concatenated (with `flush()` at the end) equal `tokenizer.decode(ids, skip_special_tokens)`.
    Other tokenizers decode a sliding window and hold back text that ends in U+FFFD."""

    def __init__(self, tokenizer: ExaoneTokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._table = tokenizer._byte_table
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []  # generic path only
        self._prefix = 0
        self._read = 0

    def add(self, token_id: int) -> str:
        """Feed one token id; returns the text completed by it ('' while a character is partial)."""
        if self.skip_special_tokens and token_id in self.tokenizer.special_ids:
            return ""
        if token_id < 0:
            raise ValueError(f"token_id: {token_id} is negative")
        if token_id >= self.tokenizer.vocab_size:
            # A model's embedding may have more rows than the tokenizer has tokens: such ids have no text.
            return ""
        if self._table is not None:
            return self._utf8.decode(self._table[token_id])
        return self._add_generic(int(token_id))

    def add_many(self, token_ids: Iterable[int]) -> str:
        return "".join(self.add(t) for t in token_ids)

    def flush(self) -> str:
        """Text still held back (an incomplete character at the very end becomes U+FFFD)."""
        if self._table is not None:
            return self._utf8.decode(b"", final=True)
        dec = self.tokenizer._tok.decode
        rest = dec(self._ids[self._prefix:], skip_special_tokens=False)[len(
            dec(self._ids[self._prefix:self._read], skip_special_tokens=False)):]
        self._read = len(self._ids)
        return rest

    def _add_generic(self, token_id: int) -> str:
        # Decode from the previous emit point, so that what depends on the neighbour (a leading
        # space, a character over several tokens) comes out as in a full decode.
        self._ids.append(token_id)
        dec = self.tokenizer._tok.decode
        before = dec(self._ids[self._prefix:self._read], skip_special_tokens=False)
        after = dec(self._ids[self._prefix:], skip_special_tokens=False)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before):]
        return ""
