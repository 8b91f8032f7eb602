"""The OpenAI request bodies the server accepts, checked field by field, and the response
objects it returns (chat.completion, chat.completion.chunk, text_completion, error).

Every check that fails raises APIError with the status and the error body OpenAI's API gives
for it: {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from ..generation import GenerationConfig

# Roles of EXAONE's chat format. "developer" is OpenAI's newer name for the system turn.
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP_STRINGS = 4
# finish_reason for each of the engine's stop reasons
FINISH_REASONS = {"stop_token": "stop", "stop_string": "stop", "length": "length"}


class APIError(Exception):
    """An error answered to the client as OpenAI error JSON with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class ParsedRequest:
    """What one request asks for: the prompt (a string or token ids for completions, messages
    for chat), how to decode, and how to answer."""

    model: str
    prompt: object
    config_changes: dict
    max_tokens: int | None
    stream: bool
    include_usage: bool


# ---------------------------------------------------------------------------- field checks
def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _number(body: Mapping, name: str, lo: float, hi: float, *, lo_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_number(value):
        raise bad(f"{name}: expected a number, got {value!r}", name)
    if value > hi or value < lo or (lo_open and value == lo):
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise bad(f"{name}: {value!r} is out of range; expected a number in {interval}", name)
    return float(value)


def _integer(body: Mapping, name: str, lo: int, hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value):
        raise bad(f"{name}: expected an integer, got {value!r}", name)
    if value < lo or (hi is not None and value > hi):
        raise bad(f"{name}: {value} is out of range; expected an integer >= {lo}"
                  + (f" and <= {hi}" if hi is not None else ""), name)
    return value


def _boolean(body: Mapping, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"{name}: expected true or false, got {value!r}", name)
    return value


def _check_model(body: Mapping, served: str) -> str:
    model = body.get("model")
    if model is None:
        raise bad("model: missing (the served model is " + repr(served) + ")", "model")
    if not isinstance(model, str):
        raise bad(f"model: expected a string, got {model!r}", "model")
    if model != served:
        raise APIError(404, f"The model {model!r} does not exist; this server serves {served!r}",
                       param="model", code="model_not_found")
    return model


def _decoding(body: Mapping) -> tuple[dict, int | None, bool, bool]:
    """GenerationConfig changes, max_tokens, stream, include_usage from the sampling fields shared
    by both endpoints."""
    changes: dict = {}
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0, lo_open=True)
    min_p = _number(body, "min_p", 0.0, 1.0)
    top_k = _integer(body, "top_k", -1)
    repetition_penalty = _number(body, "repetition_penalty", 0.0, 10.0, lo_open=True)
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, -2.0, 2.0):
            raise bad(f"{name}: not supported by this server (only 0); use repetition_penalty", name)
    if temperature is not None:
        changes["temperature"] = temperature
        changes["do_sample"] = temperature > 0
    elif top_p is not None or min_p is not None or top_k not in (None, 0, -1):
        changes["do_sample"] = True  # a sampling control implies sampling, as on the command line
    if top_p is not None:
        changes["top_p"] = top_p
    if min_p is not None:
        changes["min_p"] = min_p
    if top_k is not None:
        changes["top_k"] = max(top_k, 0)  # -1 is "off", as in vLLM
    if repetition_penalty is not None:
        changes["repetition_penalty"] = repetition_penalty
    seed = _integer(body, "seed", -2**63, 2**64 - 1)
    if seed is not None:
        changes["seed"] = seed
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise bad(f"stop: expected a non-empty string or a list of them, got {stop!r}", "stop")
        if len(stops) > MAX_STOP_STRINGS:
            raise bad(f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}", "stop")
        changes["stop_strings"] = stops
    if _boolean(body, "ignore_eos", False):  # vLLM's extension: run to max_tokens (benchmarks)
        changes["stop_token_ids"] = []
    max_tokens = _integer(body, "max_tokens", 1)
    if body.get("max_completion_tokens") is not None:
        max_tokens = _integer(body, "max_completion_tokens", 1)
    n = _integer(body, "n", 1)
    if n is not None and n != 1:
        raise bad(f"n: only 1 choice per request is supported, got {n}", "n")
    best_of = _integer(body, "best_of", 1)
    if best_of is not None and best_of != 1:
        raise bad(f"best_of: only 1 is supported, got {best_of}", "best_of")
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") is not None:
        raise bad("logprobs: not supported by this server", "logprobs")
    stream = _boolean(body, "stream", False)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad("stream_options: only allowed when stream is true", "stream_options")
        if not isinstance(options, Mapping):
            raise bad(f"stream_options: expected an object, got {options!r}", "stream_options")
        include_usage = _boolean(options, "include_usage", False)
    return changes, max_tokens, stream, include_usage


def _content(value, where: str) -> str:
    """A message's content: a string, null, or a list of {"type": "text", "text": ...} parts."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for i, part in enumerate(value):
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"{where}[{i}]: only text parts ({{'type': 'text', 'text': ...}}) are supported, "
                          f"got {part!r}"[:300], where)
            parts.append(part["text"])
        return "".join(parts)
    raise bad(f"{where}: expected a string or a list of text parts, got {type(value).__name__}", where)


def parse_chat(body, served_model: str) -> ParsedRequest:
    """POST /v1/chat/completions body -> ParsedRequest with prompt = EXAONE chat messages."""
    if not isinstance(body, Mapping):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}")
    model = _check_model(body, served_model)
    messages = body.get("messages")
    if messages is None:
        raise bad("messages: missing (a list of {'role', 'content'} objects)", "messages")
    if not isinstance(messages, list) or not messages:
        raise bad(f"messages: expected a non-empty list, got {messages!r}"[:300], "messages")
    chat = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, Mapping):
            raise bad(f"{where}: expected an object with 'role' and 'content', got {type(m).__name__}", where)
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"{where}.role: {role!r} is not one of {sorted(ROLES)}", f"{where}.role")
        if "content" not in m:
            raise bad(f"{where}.content: missing", f"{where}.content")
        chat.append({"role": ROLES[role], "content": _content(m["content"], f"{where}.content")})
    for name in ("tools", "functions", "response_format"):
        if body.get(name) is not None:
            raise bad(f"{name}: not supported by this server", name)
    changes, max_tokens, stream, include_usage = _decoding(body)
    return ParsedRequest(model, chat, changes, max_tokens, stream, include_usage)


def parse_completion(body, served_model: str) -> ParsedRequest:
    """POST /v1/completions body -> ParsedRequest with prompt = a string or token ids (no template)."""
    if not isinstance(body, Mapping):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}")
    model = _check_model(body, served_model)
    prompt = body.get("prompt")
    if prompt is None:
        raise bad("prompt: missing", "prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        if not prompt or not all(_is_int(t) and t >= 0 for t in prompt):
            raise bad("prompt: expected a string, a list of token ids, or a list holding one of these "
                      "(one prompt per request)", "prompt")
    elif not isinstance(prompt, str):
        raise bad(f"prompt: expected a string or a list of token ids, got {type(prompt).__name__}", "prompt")
    if prompt == "":
        raise bad("prompt: empty (there is nothing to continue)", "prompt")
    if _boolean(body, "echo", False):
        raise bad("echo: not supported by this server", "echo")
    if body.get("suffix") is not None:
        raise bad("suffix: not supported by this server", "suffix")
    changes, max_tokens, stream, include_usage = _decoding(body)
    return ParsedRequest(model, prompt, changes, max_tokens, stream, include_usage)


def build_config(base: GenerationConfig, parsed: ParsedRequest, prompt_len: int, context: int,
                 vocab_size: int, prompt_ids: list[int]) -> GenerationConfig:
    """The request's GenerationConfig; refuses prompts and max_tokens that do not fit the context
    (prompt + completion <= context, as OpenAI counts)."""
    bad_id = next((t for t in prompt_ids if t >= vocab_size), None)
    if bad_id is not None:
        raise bad(f"prompt: token id {bad_id} is outside the model's vocabulary [0, {vocab_size})", "prompt")
    if prompt_len >= context:
        raise bad(f"This model's maximum context length is {context} tokens; the prompt is {prompt_len} tokens, "
                  "which leaves no room for a completion", "messages", code="context_length_exceeded")
    max_tokens = parsed.max_tokens if parsed.max_tokens is not None else context - prompt_len
    if prompt_len + max_tokens > context:
        raise bad(f"This model's maximum context length is {context} tokens. However, you requested "
                  f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the completion). "
                  "Please reduce the prompt or max_tokens.", "max_tokens", code="context_length_exceeded")
    try:
        return base.replace(max_new_tokens=max_tokens, **parsed.config_changes)
    except (TypeError, ValueError) as e:  # a value GenerationConfig refuses that the checks above let by
        raise bad(str(e).replace("GenerationConfig.", "")) from None


# ---------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(rid: str, model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chat_chunk(rid: str, created: int, model: str, delta: dict | None, finish: str | None = None,
               usage_: dict | None = None) -> dict:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        chunk["usage"] = usage_
    return chunk


def completion_response(rid: str, model: str, text: str, finish: str, prompt_tokens: int,
                        completion_tokens: int) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            "usage": usage(prompt_tokens, completion_tokens)}


def completion_chunk(rid: str, created: int, model: str, text: str | None, finish: str | None = None,
                     usage_: dict | None = None) -> dict:
    choices = [] if text is None else [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]
    chunk = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        chunk["usage"] = usage_
    return chunk
