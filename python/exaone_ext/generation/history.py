"""Keeping a multi-turn conversation inside the model's context."""
from __future__ import annotations

from typing import Mapping, Sequence

from ..tokenizer import ExaoneTokenizer


def trim_history(tokenizer: ExaoneTokenizer, messages: Sequence[Mapping], max_tokens: int) -> tuple[list, int]:
    """Drops the oldest turns of a conversation until its chat-formatted prompt (with the generation
    prompt) has at most `max_tokens` tokens. Leading system messages and the last message are always
    kept; a turn is a user message with the replies that follow it, dropped together. Returns
    (messages, number of messages dropped). When even the shortest form is too long it is returned
    as it is, and generation reports the length against the context."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"trim_history: 'max_tokens' must be a positive int, got {max_tokens!r}")
    messages = list(messages)
    head = 0
    while head < len(messages) and messages[head].get("role") == "system":
        head += 1
    system, turns = messages[:head], messages[head:]
    dropped = 0
    while len(turns) > 1 and len(tokenizer.apply_chat_template(system + turns, tokenize=True)) > max_tokens:
        cut = 1  # the oldest message, and every non-user message after it up to the next user message
        while cut < len(turns) - 1 and turns[cut].get("role") != "user":
            cut += 1
        turns = turns[cut:]
        dropped += cut
    return system + turns, dropped
