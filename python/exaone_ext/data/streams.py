"""Row streams for each training stage, with a state a resumed run continues from exactly.

Every rank builds the same global stream of rows and keeps its own share (`shard`): rows
rank, rank + world, ... of each step. The global batch is therefore the one a single process
sees, whatever the number of processes.
"""
from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence

import torch

from .chat import PreferenceExample, chat_messages, encode_chat, encode_preference
from .packing import Packer, Piece, Row, doc_pieces
from .sources import DataError, DocumentReader, check_files, read_jsonl

__all__ = ["PretrainStream", "SFTStream", "PreferenceData", "shard"]


def shard(items: Sequence, rank: int, world: int) -> list:
    """This rank's share of one step's global items (each rank a disjoint part, in a fixed order)."""
    if len(items) % world:
        raise ValueError(f"shard: {len(items)} items do not split evenly over {world} processes")
    return list(items[rank::world])


def _check_len(seq_len: int, max_len: int | None, what: str) -> None:
    if not isinstance(seq_len, int) or seq_len < 2:
        raise DataError(f"{what}: seq_len must be an int >= 2, got {seq_len!r}")
    if max_len is not None and seq_len > max_len:
        raise DataError(f"{what}: seq_len {seq_len} is longer than the model's context ({max_len} positions)")


class PretrainStream:
    """Pre-training rows of `seq_len` tokens (documents + [|endofturn|] as the end-of-text token).

    stage 1 (replay_files None): documents cut into pieces of `seq_len`, rows filled tight.
    stage 2: documents kept whole up to `seq_len` (the extended length; longer ones cut into
    pieces of seq_len), rows padded where the next one does not fit; a `replay_fraction` of the
    documents comes from `replay_files` (stage-1 data) cut at `replay_len` (the stage-1 length).
    Which documents are replayed depends only on the seed and the document's index."""

    def __init__(self, tokenizer, files, seq_len: int, field: str = "text", split: str = "paragraph",
                 replay_files=None, replay_fraction: float = 0.0, replay_len: int | None = None,
                 seed: int = 0, max_len: int | None = None):
        _check_len(seq_len, max_len, "pretraining data")
        self.tok, self.seq_len, self.seed = tokenizer, seq_len, seed
        self.reader = DocumentReader(files, field=field, split=split)
        self.stage2 = replay_files is not None
        if self.stage2:
            if not 0.0 <= replay_fraction < 1.0:
                raise DataError(f"replay_fraction must be in [0, 1), got {replay_fraction!r}")
            self.replay = DocumentReader(replay_files, field=field, split=split)
            self.replay_len = replay_len or seq_len
            if self.replay_len > seq_len:
                raise DataError(f"replay_len {self.replay_len} exceeds seq_len {seq_len}")
        self.replay_fraction = replay_fraction
        self.packer = Packer(seq_len, tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                             else tokenizer.eos_token_id, split=not self.stage2)
        self.pending: deque[Piece] = deque()   # the rest of a document cut into several pieces
        self.docs = 0

    def _next_piece(self) -> Piece:
        if not self.pending:
            replay = self.stage2 and random.Random(self.seed * 1_000_003 + self.docs).random() < self.replay_fraction
            reader = self.replay if replay else self.reader
            text, where = reader.next()
            self.docs += 1
            ids = self.tok.encode(text) + [self.tok.eos_token_id]
            self.pending.extend(doc_pieces(ids, self.replay_len if replay else self.seq_len, where))
        return self.pending.popleft()

    def next_row(self) -> Row:
        return self.packer.next_row(self._next_piece)

    def state_dict(self) -> dict:
        return {"reader": self.reader.state_dict(),
                "replay": self.replay.state_dict() if self.stage2 else None,
                "pending": [(p.ids, p.labels, p.where) for p in self.pending],
                "packer": self.packer.state_dict(), "docs": self.docs}

    def load_state_dict(self, state: dict) -> None:
        self.reader.load_state_dict(state["reader"])
        if self.stage2:
            self.replay.load_state_dict(state["replay"])
        self.pending = deque(Piece(list(i), list(l), w) for i, l, w in state["pending"])
        self.packer.load_state_dict(state["packer"])
        self.docs = state["docs"]


class SFTStream:
    """SFT rows of `seq_len` tokens: conversations kept whole (one longer than seq_len is an error
    naming its line), loss on the assistant replies only."""

    def __init__(self, tokenizer, files, seq_len: int, field: str = "messages", max_len: int | None = None):
        _check_len(seq_len, max_len, "SFT data")
        self.tok, self.seq_len, self.max_len = tokenizer, seq_len, max_len
        self.reader = DocumentReader(check_files(files, "SFT data"), field=field, kind="jsonl")
        self.reader.field = None  # whole objects: the messages are checked here
        self.packer = Packer(seq_len, tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                             else tokenizer.eos_token_id, split=False)

    def _next_piece(self) -> Piece:
        obj, where = self.reader.next_object()
        ids, labels = encode_chat(self.tok, chat_messages(obj, where), where)
        if len(ids) > self.seq_len:
            limit = f"seq_len {self.seq_len}" + (f" (the model's context is {self.max_len})" if self.max_len else "")
            raise DataError(f"{where}: the conversation has {len(ids)} tokens, longer than {limit}")
        return Piece(ids, labels, where)

    def next_row(self) -> Row:
        return self.packer.next_row(self._next_piece)

    def state_dict(self) -> dict:
        return {"reader": self.reader.state_dict(), "packer": self.packer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.reader.load_state_dict(state["reader"])
        self.packer.load_state_dict(state["packer"])


class PreferenceData:
    """Preference pairs, held in memory (tokenised once), served in a seeded order per epoch.

    next_pairs(n) -> n (index, example) of the global stream; index keys precomputed reference
    log-probabilities."""

    def __init__(self, tokenizer, files, max_len: int | None = None, seed: int = 0,
                 examples: list[PreferenceExample] | None = None):
        self.seed, self.epoch, self.pos = seed, 0, 0
        if examples is None:
            examples = []
            for path in check_files(files, "preference data"):
                for obj, line in read_jsonl(path):
                    ex = encode_preference(tokenizer, obj, f"{path}:{line}")
                    longest = len(ex.prompt) + max(len(ex.chosen), len(ex.rejected))
                    if max_len is not None and longest > max_len:
                        raise DataError(f"{ex.where}: prompt + response is {longest} tokens, longer than the "
                                        f"model's context ({max_len})")
                    examples.append(ex)
        if not examples:
            raise DataError(f"{files}: no preference pairs")
        self.examples = examples
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        return torch.randperm(len(self.examples), generator=g).tolist()

    def next_pairs(self, n: int) -> list[tuple[int, PreferenceExample]]:
        out = []
        for _ in range(n):
            if self.pos == len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._permutation()
            i = self._order[self.pos]
            self.pos += 1
            out.append((i, self.examples[i]))
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._permutation()


def preference_rows(pairs: Sequence[tuple[int, PreferenceExample]]) -> list[Row]:
    """Each pair as two documents (prompt + chosen, prompt + rejected), labels on the replies only."""
    from .packing import IGNORE_INDEX
    rows = []
    for _, ex in pairs:
        for reply in (ex.chosen, ex.rejected):
            ids = ex.prompt + reply
            labels = [IGNORE_INDEX] * (len(ex.prompt) - 1) + reply + [IGNORE_INDEX]
            rows.append(Row(ids, labels, [len(ids)]))
    return rows
