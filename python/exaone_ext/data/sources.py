"""Documents streamed from plain-text and JSONL files, with a position a resumed run continues from.

    reader = DocumentReader(["a.jsonl", "b.jsonl"], field="text")
    text, where = reader.next()          # where = "a.jsonl:17"
    state = reader.state_dict()          # {"file": 0, "offset": 1234, "line": 17, "epoch": 0}

Files are read one line at a time from a byte offset, so a corpus larger than memory streams; at
the end of the last file the reader starts the first one again (the next epoch). Plain text: one
document per paragraph (documents separated by empty lines), or one per line with split="line".
JSONL: one JSON object per line, the document in `field`; empty lines are skipped.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence

__all__ = ["DataError", "DocumentReader", "check_files", "read_jsonl"]


class DataError(ValueError):
    """Bad training data; the message names the file and line."""


def check_files(files, what: str) -> list[str]:
    """`files` (a path or a list of paths) as a list of existing file paths, else DataError."""
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    if not isinstance(files, Sequence) or not files:
        raise DataError(f"{what}: expected a file path or a non-empty list of them, got {files!r}")
    out = []
    for f in files:
        if not isinstance(f, (str, os.PathLike)):
            raise DataError(f"{what}: expected file paths, got {f!r}")
        f = os.fspath(f)
        if not os.path.isfile(f):
            raise DataError(f"{f}: no such file ({what})")
        out.append(f)
    return out


def _parse_json_line(raw: bytes, path: str, line: int):
    try:
        return json.loads(raw)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{line}: not UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{line}: malformed JSON line ({e.msg} at column {e.colno})") from None


def read_jsonl(path: str):
    """Yields (object, line number) of each non-empty line of a JSONL file; DataError names file:line."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if raw.strip():
                yield _parse_json_line(raw, path, n), n


class DocumentReader:
    """Documents of `files` in order, cycling through them epoch after epoch.

    kind: "text" or "jsonl" (default from each file's suffix: .jsonl/.json -> jsonl);
    field: the JSONL key holding the document; split: "paragraph" or "line" for plain text."""

    def __init__(self, files, field: str = "text", kind: str | None = None, split: str = "paragraph"):
        self.files = check_files(files, "data files")
        if kind not in (None, "text", "jsonl"):
            raise DataError(f"DocumentReader: kind must be 'text' or 'jsonl', got {kind!r}")
        if split not in ("paragraph", "line"):
            raise DataError(f"DocumentReader: split must be 'paragraph' or 'line', got {split!r}")
        self.kinds = [kind or ("jsonl" if f.endswith((".jsonl", ".json")) else "text") for f in self.files]
        self.field, self.split = field, split
        self.file, self.offset, self.line, self.epoch = 0, 0, 0, 0
        self._handle = None
        self._docs_this_epoch = 0

    def state_dict(self) -> dict:
        return {"file": self.file, "offset": self.offset, "line": self.line, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.file, self.offset, self.line, self.epoch = state["file"], state["offset"], state["line"], state["epoch"]
        self._docs_this_epoch = 1  # a saved position was reached by reading documents

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def _readline(self) -> bytes:
        if self._handle is None:
            self._handle = open(self.files[self.file], "rb")
            self._handle.seek(self.offset)
        raw = self._handle.readline()
        if raw:
            self.line += 1
            self.offset = self._handle.tell()
        return raw

    def _next_file(self) -> None:
        self.close()
        self.file, self.offset, self.line = self.file + 1, 0, 0
        if self.file == len(self.files):
            if self._docs_this_epoch == 0:
                raise DataError(f"{', '.join(self.files)}: no documents in the data files")
            self.file, self.epoch, self._docs_this_epoch = 0, self.epoch + 1, 0

    def next(self) -> tuple[str, str]:
        """The next document's text and where it starts ("path:line")."""
        return self.next_object()

    def next_object(self):
        """Like next(); with field=None a JSONL line's whole object instead of one field."""
        while True:
            path = self.files[self.file]
            raw = self._readline()
            if not raw:
                self._next_file()
                continue
            if not raw.strip():
                continue
            start = self.line
            if self.kinds[self.file] == "jsonl":
                obj = _parse_json_line(raw, path, start)
                text = obj if self.field is None else self._field(obj, path, start)
            else:
                lines = [raw]
                while self.split == "paragraph":
                    nxt = self._readline()
                    if not nxt.strip():
                        break
                    lines.append(nxt)
                text = self._decode(b"".join(lines), path, start).rstrip("\n")
            self._docs_this_epoch += 1
            return text, f"{path}:{start}"

    def _field(self, obj, path: str, line: int) -> str:
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{line}: expected a JSON object, got {type(obj).__name__}")
        if self.field not in obj:
            raise DataError(f"{path}:{line}: no field {self.field!r} (the line has {sorted(obj)})")
        text = obj[self.field]
        if not isinstance(text, str):
            raise DataError(f"{path}:{line}: field {self.field!r} must be a string, got {type(text).__name__}")
        return text

    @staticmethod
    def _decode(raw: bytes, path: str, line: int) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{line}: not UTF-8 ({e.reason})") from None
