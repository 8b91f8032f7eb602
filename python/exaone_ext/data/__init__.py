"""Training data: streamed documents, packing into varlen rows, SFT and preference examples, and
decontamination against benchmark test sets.

    from exaone_ext.data import PretrainStream, collate
    stream = PretrainStream(tokenizer, ["corpus.jsonl"], seq_len=2048, field="text")
    batch = collate([stream.next_row() for _ in range(4)])   # Batch: input_ids [1, 4 * 2048], cu_seqlens, ...
    state = stream.state_dict()                              # resume: stream.load_state_dict(state)
    from exaone_ext.data import DecontaminationPool, decontaminate, normalize
"""
from .chat import PreferenceExample, chat_messages, encode_chat, encode_preference
from .decontaminate import DecontaminationPool, Match, decontaminate, normalize, read_test_set
from .packing import IGNORE_INDEX, Batch, Packer, Piece, Row, collate, doc_pieces
from .sources import DataError, DocumentReader, read_jsonl
from .streams import PreferenceData, PretrainStream, SFTStream, preference_rows, shard

__all__ = ["IGNORE_INDEX", "Batch", "DataError", "DecontaminationPool", "DocumentReader", "Match", "Packer", "Piece",
           "PreferenceData", "PreferenceExample", "PretrainStream", "Row", "SFTStream", "chat_messages", "collate",
           "decontaminate", "doc_pieces", "encode_chat", "encode_preference", "normalize", "preference_rows",
           "read_jsonl", "read_test_set", "shard"]
