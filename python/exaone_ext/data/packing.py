"""Packing token pieces into rows of a fixed token budget, and rows into the model's varlen batches.

A piece is a document (or part of one): token ids and, per token, the id the model should predict
there (-100 where nothing is learnt). Rows hold several pieces; `collate` turns rows into one
packed sequence [1, total] with int32 cu_seqlens and per-piece position ids, so the model's varlen
attention keeps every piece to itself.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["IGNORE_INDEX", "Piece", "Row", "Batch", "Packer", "doc_pieces", "collate"]

IGNORE_INDEX = -100


@dataclass
class Piece:
    ids: list[int]
    labels: list[int]   # labels[t]: the token to predict after ids[t], or IGNORE_INDEX
    where: str = ""     # "path:line" of the document it comes from

    def split(self, n: int) -> tuple["Piece", "Piece"]:
        return Piece(self.ids[:n], self.labels[:n], self.where), Piece(self.ids[n:], self.labels[n:], self.where)


@dataclass
class Row:
    ids: list[int]
    labels: list[int]
    lengths: list[int]  # the pieces' lengths, in order (a padding piece included)


@dataclass
class Batch:
    """input_ids, labels, position_ids: int64 [1, total]; cu_seqlens int32 [n_pieces + 1]."""
    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    num_targets: int    # labels that are not IGNORE_INDEX

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.labels.to(device), self.position_ids.to(device),
                     self.cu_seqlens.to(device), self.max_seqlen, self.num_targets)


def doc_pieces(ids: list[int], cut: int | None, where: str = "", labels: list[int] | None = None) -> list[Piece]:
    """A document's pieces of at most `cut` tokens (None: one piece). Labels default to next-token
    labels (the last token learns nothing: what follows is another document)."""
    if labels is None:
        labels = ids[1:] + [IGNORE_INDEX]
    if cut is None or len(ids) <= cut:
        return [Piece(ids, labels, where)]
    return [Piece(ids[i:i + cut], labels[i:i + cut], where) for i in range(0, len(ids), cut)]


class Packer:
    """Fills rows of `seq_len` tokens from pieces.

    split=True: a piece that overflows a row is split at the row's end and the rest opens the
    next row (no padding; stage-1 pre-training). split=False: a piece that does not fit starts the
    next row and the row is padded (documents kept whole; stage 2, SFT). The pieces waiting for
    the next row are the packer's carry-over (state_dict)."""

    def __init__(self, seq_len: int, pad_id: int, split: bool):
        self.seq_len, self.pad_id, self.split = seq_len, pad_id, split
        self.carry: deque[Piece] = deque()

    def next_row(self, next_piece: Callable[[], Piece]) -> Row:
        ids: list[int] = []
        labels: list[int] = []
        lengths: list[int] = []
        while len(ids) < self.seq_len:
            room = self.seq_len - len(ids)
            piece = self.carry.popleft() if self.carry else next_piece()
            if len(piece.ids) > room:
                if self.split:
                    piece, rest = piece.split(room)
                    self.carry.appendleft(rest)
                elif len(piece.ids) > self.seq_len:
                    raise ValueError(f"{piece.where}: a piece of {len(piece.ids)} tokens does not fit a row of "
                                     f"{self.seq_len} (cut it first)")
                else:
                    self.carry.appendleft(piece)
                    ids += [self.pad_id] * room
                    labels += [IGNORE_INDEX] * room
                    lengths.append(room)
                    break
            ids += piece.ids
            labels += piece.labels
            lengths.append(len(piece.ids))
        return Row(ids, labels, lengths)

    def state_dict(self) -> dict:
        return {"carry": [(p.ids, p.labels, p.where) for p in self.carry]}

    def load_state_dict(self, state: dict) -> None:
        self.carry = deque(Piece(list(i), list(l), w) for i, l, w in state["carry"])


def collate(rows: Sequence[Row]) -> Batch:
    """Rows -> one packed Batch (every piece of every row a separate document)."""
    ids = [t for r in rows for t in r.ids]
    labels = [t for r in rows for t in r.labels]
    lengths = [n for r in rows for n in r.lengths if n > 0]
    cu = [0]
    positions: list[int] = []
    for n in lengths:
        cu.append(cu[-1] + n)
        positions.extend(range(n))
    labels_t = torch.tensor(labels, dtype=torch.long)[None]
    return Batch(torch.tensor(ids, dtype=torch.long)[None], labels_t, torch.tensor(positions, dtype=torch.long)[None],
                 torch.tensor(cu, dtype=torch.int32), max(lengths), int((labels_t != IGNORE_INDEX).sum()))
