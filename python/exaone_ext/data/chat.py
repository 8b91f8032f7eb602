"""SFT and preference examples in EXAONE's chat format.

SFT line:        {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
                 (or {"prompt": str, "response": str, "system": str (optional)})
Preference line: {"prompt": str or "messages": [...], "chosen": str, "rejected": str}
                 (chosen / rejected may also be [{"role": "assistant", "content": str}])

The text is rendered with the tokenizer's chat template; the loss covers each assistant reply and
its [|endofturn|] (the newline after it and everything else learns nothing).
"""
from __future__ import annotations

from dataclasses import dataclass

from .packing import IGNORE_INDEX
from .sources import DataError

__all__ = ["encode_chat", "chat_messages", "PreferenceExample", "encode_preference"]


def chat_messages(obj, where: str) -> list[dict]:
    """The messages of one SFT line (either form), checked."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = obj["messages"]
    elif "prompt" in obj and "response" in obj:
        messages = ([{"role": "system", "content": obj["system"]}] if obj.get("system") else []) + [
            {"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["response"]}]
    else:
        raise DataError(f"{where}: expected 'messages' or 'prompt' and 'response', the line has {sorted(obj)}")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}] must be {{'role': str, 'content': str}}, got {m!r}")
        if m["role"] == "assistant" and not m["content"].strip():
            raise DataError(f"{where}: messages[{i}] is an empty assistant response")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message (nothing to learn)")
    return messages


def encode_chat(tokenizer, messages: list[dict], where: str = "") -> tuple[list[int], list[int]]:
    """Token ids and next-token labels of a conversation; labels are IGNORE_INDEX except where the
    next token belongs to an assistant reply (its [|endofturn|] included)."""
    eos = tokenizer.eos_token
    segments: list[tuple[str, bool]] = []   # (text, learnt)
    done = ""
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(messages[:k], add_generation_prompt=True) if k else ""
        full = tokenizer.apply_chat_template(messages[:k + 1], add_generation_prompt=False)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise DataError(f"{where}: the chat template does not render the conversation turn by turn")
        reply = full[len(prefix):]
        end = reply.rfind(eos) + len(eos) if eos and eos in reply else len(reply)
        segments += [(prefix[len(done):], False), (reply[:end], True)]
        done = prefix + reply[:end]
    rest = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    if rest.startswith(done):
        segments.append((rest[len(done):], False))   # what follows the last reply (its newline, ...)
    ids: list[int] = []
    learnt: list[bool] = []
    for text, learn in segments:
        piece = tokenizer.encode(text) if text else []
        ids += piece
        learnt += [learn] * len(piece)
    labels = [ids[t + 1] if learnt[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]
    return ids, labels


@dataclass
class PreferenceExample:
    prompt: list[int]
    chosen: list[int]      # the reply's tokens, [|endofturn|] last
    rejected: list[int]
    where: str
    messages: list[dict] | None = None   # the prompt conversation (for generating new candidates)


def _reply(value, key: str, where: str) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        value = value[0].get("content")
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string (or one assistant message), got {value!r}")
    if not value.strip():
        raise DataError(f"{where}: {key!r} is an empty response")
    return value


def preference_messages(obj, where: str) -> list[dict]:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role': str, 'content': str}}")
    elif isinstance(obj.get("prompt"), str):
        messages = [{"role": "user", "content": obj["prompt"]}]
    else:
        raise DataError(f"{where}: expected 'prompt' (a string) or 'messages', the line has {sorted(obj)}")
    return messages


def encode_preference(tokenizer, obj, where: str) -> PreferenceExample:
    messages = preference_messages(obj, where)
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise DataError(f"{where}: no field {key!r} (the line has {sorted(obj)})")
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    reply = [tokenizer.encode(_reply(obj[k], k, where)) + [tokenizer.eos_token_id] for k in ("chosen", "rejected")]
    return PreferenceExample(prompt, reply[0], reply[1], where, messages)
