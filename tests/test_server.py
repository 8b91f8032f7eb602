"""exaone-ext serve: a real uvicorn server on 127.0.0.1 (free port) in front of the tiny checkpoint,
called with the official `openai` client and with httpx."""
from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from exaone_ext import ExaoneForCausalLM, ExaoneTokenizer, GenerationConfig, generate  # noqa: E402
from exaone_ext.generation.engine import Engine  # noqa: E402
from exaone_ext.serve import create_app  # noqa: E402

KEY = "test-key"
MODEL = "tiny-exaone"
CONTEXT = 512  # the tiny checkpoint's max_position_embeddings


# ---------------------------------------------------------------------------- a server in a thread
class Server:
    """uvicorn serving `app` on a socket bound to 127.0.0.1:0, in a thread; stop() shuts it down."""

    def __init__(self, app):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
        assert not self.thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="module")
def model_tok(ckpt):
    return ExaoneForCausalLM.from_pretrained(ckpt), ExaoneTokenizer.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def server(model_tok):
    model, tok = model_tok
    engine = Engine(model, tok, max_batch=8)
    srv = Server(create_app(engine, model_name=MODEL, api_key=KEY, max_waiting=64, max_body_bytes=64 * 1024))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def reference(model_tok, prompt, max_tokens, **config) -> str:
    """What `generate` gives for this prompt alone (greedy unless told)."""
    model, tok = model_tok
    return generate(model, tok, prompt, GenerationConfig(max_new_tokens=max_tokens, **config)).text


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_for(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


PROMPTS = ["Hello, how are you today?", "한국의 수도는?", "Tell me about the weather.", "사과와 바나나",
           "What is a key-value cache?", "EXAONE", "Numbers: 1 2 3", "오늘 날씨가 좋아서"]


# ---------------------------------------------------------------------------- the openai client
def test_chat(client, model_tok):
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "한국의 수도는?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == reference(model_tok, messages, 12)
    _, tok = model_tok
    assert r.usage.prompt_tokens == len(tok.apply_chat_template(messages, tokenize=True))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert choice.finish_reason == ("length" if r.usage.completion_tokens == 12 else "stop")


def test_chat_stream(client, model_tok):
    messages = [{"role": "user", "content": "Hello!"}]
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference(model_tok, messages, 20)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["length"], ["stop"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1


def test_stream_ends_with_done(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        json.loads(line[len("data: "):])


def test_completions(client, model_tok):
    prompt = "The quick brown fox"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].text == reference(model_tok, prompt, 10)
    pieces = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in pieces if c.choices) == r.choices[0].text
    # token ids as the prompt, and the stop string cut
    _, tok = model_tok
    ids = tok.encode(prompt)
    r2 = client.completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0)
    assert r2.choices[0].text == r.choices[0].text and r2.usage.prompt_tokens == len(ids)
    if len(r.choices[0].text) > 2:
        stop = r.choices[0].text[1:3]
        r3 = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0, stop=[stop])
        assert r3.choices[0].text == reference(model_tok, prompt, 10, stop_strings=[stop])
        assert r3.choices[0].finish_reason == "stop"


def test_sampling_seed(client):
    def once():
        return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=16, temperature=0.9, top_p=0.95, seed=7,
                                              extra_body={"top_k": 50, "ignore_eos": True}).choices[0].message.content
    assert once() == once()


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_health_and_metrics(server):
    r = httpx.get(server.url + "/health", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    m = metrics(server.url)
    for name in ("exaone_prompt_tokens_total", "exaone_generation_tokens_total", "exaone_requests_running",
                 "exaone_requests_waiting", "exaone_batch_size", "exaone_generation_tokens_per_second"):
        assert name in m


# ---------------------------------------------------------------------------- continuous batching
async def _stream_chat(aclient, prompt, max_tokens, **extra):
    s = await aclient.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                              max_tokens=max_tokens, temperature=0, stream=True, **extra)
    parts = []
    async for c in s:
        if c.choices:
            parts.append(c.choices[0].delta.content or "")
    return "".join(parts)


def test_32_concurrent_greedy_streams(server, model_tok):
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(32)]
    lengths = [6 + (5 * i) % 23 for i in range(32)]
    before = metrics(server.url)

    async def run():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        try:
            return await asyncio.gather(*(_stream_chat(aclient, p, n) for p, n in zip(prompts, lengths)))
        finally:
            await aclient.close()

    texts = asyncio.run(run())
    for p, n, text in zip(prompts, lengths, texts):
        assert text == reference(model_tok, [{"role": "user", "content": p}], n), p
    after = metrics(server.url)
    assert after["exaone_batch_size_max"] > 1
    steps = after["exaone_decode_steps_total"] - before["exaone_decode_steps_total"]
    rows = after["exaone_batch_size_sum"] - before["exaone_batch_size_sum"]
    assert rows / steps > 4, f"mean batch {rows / steps:.2f}: requests did not run together"


class Reader(threading.Thread):
    """Streams one chat completion with httpx, recording the text and each chunk's arrival."""

    def __init__(self, url, prompt, max_tokens, stop_after=None):
        super().__init__(daemon=True)
        self.url, self.prompt, self.max_tokens, self.stop_after = url, prompt, max_tokens, stop_after
        self.text, self.chunks, self.done, self.error = "", 0, False, None

    def run(self):
        body = {"model": MODEL, "messages": [{"role": "user", "content": self.prompt}], "max_tokens": self.max_tokens,
                "temperature": 0, "stream": True, "ignore_eos": True}
        try:
            with httpx.stream("POST", self.url + "/v1/chat/completions", json=body,
                              headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        self.done = True
                    elif line.startswith("data: "):
                        choices = json.loads(line[6:])["choices"]
                        if choices:
                            self.text += choices[0]["delta"].get("content") or ""
                            self.chunks += 1
                    if self.stop_after is not None and self.chunks >= self.stop_after:
                        return  # leaving the block closes the connection mid-stream
        except Exception as e:  # noqa: BLE001 (reported by the test)
            self.error = e


def test_request_joins_running_batch(server, model_tok):
    wait_for(lambda: metrics(server.url)["exaone_requests_running"] == 0, what="an idle server")
    first = Reader(server.url, "Tell me a long story.", 450)
    first.start()
    wait_for(lambda: first.chunks >= 3, what="the first stream to start")
    assert metrics(server.url)["exaone_batch_size"] == 1
    second = Reader(server.url, "안녕?", 24)
    second.start()
    second.join(60)
    assert second.done and second.error is None
    assert first.is_alive() and not first.done, "the long request should still be running"
    m = metrics(server.url)
    first.join(60)
    assert first.done and first.error is None
    # both ran in the same decode steps; and each text is what it is alone
    assert m["exaone_batch_size_max"] >= 2
    cfg = dict(stop_token_ids=[])
    assert second.text == reference(model_tok, [{"role": "user", "content": "안녕?"}], 24, **cfg)
    assert first.text == reference(model_tok, [{"role": "user", "content": "Tell me a long story."}], 450, **cfg)


def test_disconnect_frees_row(server, model_tok):
    wait_for(lambda: metrics(server.url)["exaone_requests_running"] == 0, what="an idle server")
    stay = [Reader(server.url, p, 200) for p in PROMPTS[:3]]
    leaver = Reader(server.url, "I will leave early", 300, stop_after=3)
    for r in stay + [leaver]:
        r.start()
    leaver.join(30)
    assert leaver.error is None and not leaver.done
    # the row is freed while the others are still decoding
    wait_for(lambda: metrics(server.url)["exaone_requests_running"] <= 3 or not any(r.is_alive() for r in stay),
             what="the departed client's row to be freed")
    assert any(r.is_alive() for r in stay), "the remaining requests finished before the row was freed"
    for r in stay:
        r.join(60)
        assert r.done and r.error is None
        assert r.text == reference(model_tok, [{"role": "user", "content": r.prompt}], 200, stop_token_ids=[])
    wait_for(lambda: metrics(server.url)["exaone_requests_running"] == 0, what="every row to be freed")
    assert server.app.state.scheduler.held == 0


# ---------------------------------------------------------------------------- bad requests
CHAT = "/v1/chat/completions"
OK_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}


def _with(**changes):
    body = dict(OK_CHAT)
    for k, v in changes.items():
        if v is ...:
            body.pop(k)
        else:
            body[k] = v
    return body


BAD = [  # (name, path, body (dict, or bytes sent as is), status, param or code expected in the error)
    ("invalid json", CHAT, b'{"model": "tiny-exaone", "messages": [', 400, None),
    ("not an object", CHAT, b"[1, 2, 3]", 400, None),
    ("not utf-8", CHAT, b"\xff\xfe{", 400, None),
    ("unknown model", CHAT, _with(model="gpt-4o"), 404, "model_not_found"),
    ("missing model", CHAT, _with(model=...), 400, "model"),
    ("missing messages", CHAT, _with(messages=...), 400, "messages"),
    ("empty messages", CHAT, _with(messages=[]), 400, "messages"),
    ("messages not a list", CHAT, _with(messages="Hi"), 400, "messages"),
    ("unknown role", CHAT, _with(messages=[{"role": "wizard", "content": "Hi"}]), 400, "messages[0].role"),
    ("missing content", CHAT, _with(messages=[{"role": "user"}]), 400, "messages[0].content"),
    ("content not text", CHAT, _with(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content"),
    ("image part", CHAT, _with(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     400, "messages[0].content"),
    ("max_tokens 0", CHAT, _with(max_tokens=0), 400, "max_tokens"),
    ("max_tokens negative", CHAT, _with(max_tokens=-5), 400, "max_tokens"),
    ("max_tokens string", CHAT, _with(max_tokens="10"), 400, "max_tokens"),
    ("max_tokens float", CHAT, _with(max_tokens=2.5), 400, "max_tokens"),
    ("max_tokens past the context", CHAT, _with(max_tokens=CONTEXT), 400, "context_length_exceeded"),
    ("prompt longer than the context", CHAT, _with(messages=[{"role": "user", "content": "word " * 1200}]),
     400, "context_length_exceeded"),
    ("temperature > 2", CHAT, _with(temperature=2.5), 400, "temperature"),
    ("temperature < 0", CHAT, _with(temperature=-0.1), 400, "temperature"),
    ("temperature string", CHAT, _with(temperature="hot"), 400, "temperature"),
    ("top_p 0", CHAT, _with(top_p=0), 400, "top_p"),
    ("top_p > 1", CHAT, _with(top_p=1.5), 400, "top_p"),
    ("top_k < -1", CHAT, _with(top_k=-2), 400, "top_k"),
    ("min_p > 1", CHAT, _with(min_p=1.5), 400, "min_p"),
    ("seed float", CHAT, _with(seed=1.5), 400, "seed"),
    ("n 2", CHAT, _with(n=2), 400, "n"),
    ("five stops", CHAT, _with(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("empty stop", CHAT, _with(stop=[""]), 400, "stop"),
    ("presence penalty", CHAT, _with(presence_penalty=0.5), 400, "presence_penalty"),
    ("stream not bool", CHAT, _with(stream="yes"), 400, "stream"),
    ("stream_options without stream", CHAT, _with(stream_options={"include_usage": True}), 400, "stream_options"),
    ("logprobs", CHAT, _with(logprobs=True), 400, "logprobs"),
    ("completions: missing prompt", "/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("completions: empty prompt", "/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("completions: two prompts", "/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt"),
    ("completions: id outside the vocabulary", "/v1/completions", {"model": MODEL, "prompt": [5, 10**6]}, 400,
     "prompt"),
    ("completions: max_tokens past the context", "/v1/completions",
     {"model": MODEL, "prompt": "Hi", "max_tokens": 10**6}, 400, "context_length_exceeded"),
    ("body over the limit", CHAT, _with(messages=[{"role": "user", "content": "x" * 100_000}]), 413,
     "request_too_large"),
]


def _post(url, path, body, key=KEY, **kw):
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + path, content=content, headers=headers, timeout=30, **kw)


def _check_error(r, status, expect):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert {"type", "param", "code"} <= set(error)
    if expect is not None:
        assert expect in (error["param"], error["code"]), error


@pytest.mark.parametrize("name,path,body,status,expect", BAD, ids=[b[0] for b in BAD])
def test_bad_request(server, name, path, body, status, expect):
    _check_error(_post(server.url, path, body), status, expect)


def test_bad_requests_leave_server_serving(server, client, model_tok):
    for _, path, body, status, _ in BAD:
        assert _post(server.url, path, body).status_code == status
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                       temperature=0)
    assert r.choices[0].message.content == reference(model_tok, [{"role": "user", "content": "Hi"}], 5)


def test_api_key(server):
    _check_error(_post(server.url, CHAT, OK_CHAT, key=None), 401, "invalid_api_key")
    _check_error(_post(server.url, CHAT, OK_CHAT, key="wrong"), 401, "invalid_api_key")
    _check_error(httpx.get(server.url + "/v1/models", timeout=10), 401, "invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert _post(server.url, CHAT, OK_CHAT).status_code == 200
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200  # probes need no key


def test_unknown_route_and_method(server):
    _check_error(httpx.get(server.url + "/v1/nothing", timeout=10), 404, None)
    _check_error(httpx.get(server.url + CHAT, timeout=10), 405, None)


def test_queue_full_gives_503(model_tok):
    model, tok = model_tok
    srv = Server(create_app(Engine(model, tok, max_batch=1), model_name=MODEL, max_waiting=1))
    try:
        holders = [Reader(srv.url, "hold the row", 450), Reader(srv.url, "wait in line", 5)]
        holders[0].start()
        wait_for(lambda: holders[0].chunks >= 1, what="the first request to run")
        holders[1].start()
        wait_for(lambda: srv.app.state.scheduler.held == 2, what="the second request to queue")
        r = _post(srv.url, CHAT, OK_CHAT, key=None)
        _check_error(r, 503, "overloaded")
        for h in holders:
            h.join(60)
            assert h.error is None
        assert holders[1].done
        wait_for(lambda: srv.app.state.scheduler.held == 0, what="the rows to be freed")
        assert _post(srv.url, CHAT, OK_CHAT, key=None).status_code == 200
    finally:
        srv.stop()


# ---------------------------------------------------------------------------- load
def test_bounded_load(server):
    """A fixed number of mixed requests over loopback within a time limit: every one answered 200."""
    count, concurrency, limit_s = 64, 16, 45.0
    before = metrics(server.url)

    async def run():
        sem = asyncio.Semaphore(concurrency)
        headers = {"Authorization": f"Bearer {KEY}"}
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=limit_s) as http:
            async def one(i):
                async with sem:
                    if i % 3 == 0:
                        body = {"model": MODEL, "prompt": PROMPTS[i % 8], "max_tokens": 4 + i % 13, "temperature": 0}
                        r = await http.post("/v1/completions", json=body)
                        return r.status_code, r.json()["usage"]["completion_tokens"]
                    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPTS[i % 8]}],
                            "max_tokens": 4 + i % 17, "temperature": 0.8, "seed": i, "stream": i % 3 == 1}
                    if i % 3 == 1:
                        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                            lines = [line async for line in r.aiter_lines() if line]
                        return r.status_code, int(lines[-1] == "data: [DONE]")
                    r = await http.post("/v1/chat/completions", json=body)
                    return r.status_code, r.json()["usage"]["completion_tokens"]
            return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(count))), limit_s)

    start = time.monotonic()
    results = asyncio.run(run())
    elapsed = time.monotonic() - start
    assert [s for s, _ in results] == [200] * count
    assert all(n >= 1 for _, n in results)
    after = metrics(server.url)
    answered = sum(v - before.get(k, 0) for k, v in after.items() if k.startswith("exaone_requests_total{"))
    assert answered >= count and elapsed < limit_s


def test_quantized_serving(ckpt, model_tok):
    """create_app(path, quant=...) serves the quantized model: its greedy reply is the one the same
    model quantized by hand gives."""
    from exaone_ext.model.quant import QuantLinear
    app = create_app(str(ckpt), model_name=MODEL, quant="int4", max_batch=2)
    model = app.state.scheduler.engine.model
    assert isinstance(model.transformer.h[0].mlp.c_proj, QuantLinear) and model.transformer.h[0].mlp.c_proj.bits == 4
    srv = Server(app)
    try:
        r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 6,
                                                          "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        text = r.json()["choices"][0]["text"]
    finally:
        srv.stop()
    _, tok = model_tok
    assert text == reference((ExaoneForCausalLM.from_pretrained(ckpt).quantize("int4"), tok), "Hello", 6)
    with pytest.raises(ValueError, match=r"quant: expected 'int8', 'int4' or None, got 'int3'"):
        create_app(str(ckpt), quant="int3")
    with pytest.raises(ValueError, match=r"quant and quant_head apply to a model loaded from a path"):
        create_app(Engine(*model_tok, max_batch=1), quant="int8")
    with pytest.raises(ValueError, match=r"quant_head: expected 'int8', 'int4', 'float' or None, got 'bf16'"):
        create_app(str(ckpt), quant="int8", quant_head="bf16")
    head = create_app(str(ckpt), quant="int8", quant_head="int4", max_batch=1).state.scheduler.engine.model.lm_head
    assert isinstance(head, QuantLinear) and head.bits == 4
    kept = create_app(str(ckpt), quant="int8", quant_head="float", max_batch=1).state.scheduler.engine.model
    assert kept.lm_head.weight is kept.transformer.wte.weight


def test_prefill_chunk_size(ckpt, model_tok):
    """create_app(path, prefill_chunk_size=N): a prompt longer than N tokens is prefilled N per
    decode step beside a running request; both replies are the ones generate gives alone."""
    app = create_app(str(ckpt), model_name=MODEL, max_batch=2, prefill_chunk_size=3)
    assert app.state.scheduler.engine.prefill_chunk_size == 3
    long_prompt = "The capital of Korea is Seoul, and the capital of Japan is"
    assert len(model_tok[1].encode(long_prompt)) > 6
    srv = Server(app)
    try:
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(httpx.post, srv.url + "/v1/completions",
                                   json={"model": MODEL, "prompt": p, "max_tokens": n, "temperature": 0}, timeout=60)
                       for p, n in (("Hello", 12), (long_prompt, 5))]
            replies = [f.result() for f in futures]
    finally:
        srv.stop()
    assert [r.status_code for r in replies] == [200, 200], [r.text for r in replies]
    assert [r.json()["choices"][0]["text"] for r in replies] == [reference(model_tok, "Hello", 12),
                                                                 reference(model_tok, long_prompt, 5)]
    with pytest.raises(ValueError, match=r"prefill_chunk_size: expected a positive integer or None, got 0"):
        create_app(str(ckpt), prefill_chunk_size=0)


# ---------------------------------------------------------------------------- the command
@pytest.mark.slow  # a fresh interpreter imports torch and loads the checkpoint
def test_cli_serve(ckpt):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "exaone_ext.cli", "serve", "--model", str(ckpt), "--port",
                             str(port), "--max-batch", "2", "--api-key", KEY, "--served-model-name", MODEL,
                             "--quant", "int8"],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def up():
            if proc.poll() is not None:
                raise AssertionError(f"serve exited with {proc.returncode}: {proc.stderr.read()}")
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return False
        wait_for(up, timeout=120, what="exaone-ext serve to start")
        c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in c.models.list().data] == [MODEL]
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
        assert r.usage.completion_tokens >= 1
    finally:
        proc.terminate()
        proc.wait(30)
    assert re.search(r"serving 'tiny-exaone' \(int8\) on http://127\.0\.0\.1:\d+/v1", proc.stderr.read())


def test_cli_serve_bad_arguments(tmp_path):
    from exaone_ext.cli import main
    assert main(["serve", "--model", str(tmp_path / "nope")]) == 1
    assert main(["serve", "--model", str(tmp_path), "--max-batch", "0"]) == 1
