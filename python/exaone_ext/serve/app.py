"""The FastAPI application: OpenAI's chat completions, completions and models endpoints, plus
/health and /metrics, in front of a Scheduler that runs the engine in its own thread.

    app = create_app("path/to/checkpoint", api_key="secret")       # or create_app(engine)
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""
from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..generation import GenerationConfig
from . import protocol as proto
from .metrics import Metrics
from .protocol import APIError
from .scheduler import ACCEPTED, Scheduler, Stream

DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_NEW_TOKENS = 512  # a request's max_tokens when it sets none and the checkpoint has no default


def _error_response(error: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _load_engine(model_dir: str, device, dtype, max_batch: int, max_seq_len: int | None, quant: str | None = None,
                 cuda_graphs: bool = True, prefill_chunk_size: int | None = None, quant_head: str | None = None):
    import torch

    from ..generation.engine import Engine
    from ..model import ExaoneForCausalLM
    from ..tokenizer import ExaoneTokenizer

    from ..model.gguf import is_gguf_path

    if not Path(model_dir).is_dir() and not is_gguf_path(model_dir):
        raise ValueError(f"create_app: model directory {str(model_dir)!r} does not exist (expected a checkpoint "
                         f"directory or a .gguf file)")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    tokenizer = ExaoneTokenizer.from_pretrained(model_dir)
    model = ExaoneForCausalLM.from_pretrained(model_dir, dtype=dtype, device=device)
    from ..model.quant import quantize_on_load
    quantize_on_load(model, quant, quant_head, "create_app")
    return Engine(model, tokenizer, max_batch=max_batch, max_seq_len=max_seq_len, cuda_graphs=cuda_graphs,
                  prefill_chunk_size=prefill_chunk_size)


def create_app(engine_or_model_dir, *, model_name: str | None = None, api_key: str | None = None,
               max_batch: int = 8, max_waiting: int | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               device=None, dtype=None, max_seq_len: int | None = None,
               default_config: GenerationConfig | None = None, quant: str | None = None,
               cuda_graphs: bool = True, prefill_chunk_size: int | None = None,
               quant_head: str | None = None) -> FastAPI:
    """An OpenAI-compatible app serving one model.

    engine_or_model_dir: an Engine (its .model and .tokenizer are used), or a checkpoint
        directory or GGUF file, loaded on `device` in `dtype` into an Engine with `max_batch` KV-cache rows.
    model_name: the id clients pass as "model" (default: the directory's name, the GGUF file's
        name without .gguf, or "exaone").
    api_key: when set, /v1/* requires "Authorization: Bearer <api_key>" (401 otherwise).
    max_waiting: requests queued beyond the running batch before new ones get 503
        (default 4 x max_batch).
    max_body_bytes: larger request bodies get 413.
    default_config: decoding defaults a request overrides (default: the checkpoint's
        generation_config.json, else greedy).
    quant: "int8" or "int4" to quantize the loaded model's block projections, the head in int8 (a checkpoint
        directory or GGUF file only; an Engine is served as it is).
    quant_head: the head's format with quant ("int8" by default, "int4", "float" to keep it); without
        quant, "int8" / "int4" quantizes the float head of a quantized checkpoint (AWQ, GGUF).
    cuda_graphs: on a GPU, the loaded Engine replays its decode steps as CUDA graphs.
    prefill_chunk_size: prompt tokens the loaded Engine puts in one pass (default 8192): newcomers
        that fit ride in the running rows' decode pass; a longer prompt goes in chunks of this
        size, one per decode step, so the running rows' time per token grows by at most one chunk.
    """
    if quant is not None and quant not in ("int8", "int4"):
        raise ValueError(f"create_app: quant: expected 'int8', 'int4' or None, got {quant!r}")
    from ..model.quant import QUANT_HEAD_CHOICES
    if quant_head not in (None, *QUANT_HEAD_CHOICES):  # checked before a model is loaded
        raise ValueError(f"create_app: quant_head: expected {', '.join(map(repr, QUANT_HEAD_CHOICES))} or None, "
                         f"got {quant_head!r}")
    if isinstance(engine_or_model_dir, (str, os.PathLike)):
        model_dir = os.fspath(engine_or_model_dir)
        engine = _load_engine(model_dir, device, dtype, max_batch, max_seq_len, quant, cuda_graphs, prefill_chunk_size,
                              quant_head)
        resolved = Path(model_dir).resolve()
        model_name = model_name or (resolved.name if resolved.is_dir() else resolved.stem)
        if default_config is None:
            default_config = GenerationConfig.from_pretrained(model_dir,
                                                              defaults={"max_new_tokens": DEFAULT_MAX_NEW_TOKENS})
    else:
        engine = engine_or_model_dir
        if quant is not None or quant_head is not None:
            raise ValueError("create_app: quant and quant_head apply to a model loaded from a path; quantize the "
                             "Engine's model (model.quantize) before serving it")
        for attr in ("add", "cancel", "step", "model", "tokenizer"):
            if not hasattr(engine, attr):
                raise TypeError(f"create_app: engine_or_model_dir: expected an Engine or a checkpoint directory, "
                                f"got {type(engine).__name__} (no .{attr})")
        max_batch = getattr(engine, "max_batch", max_batch)
    if not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise ValueError(f"create_app: max_body_bytes: expected a positive integer, got {max_body_bytes!r}")
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise ValueError("create_app: api_key: expected a non-empty string or None")
    model_name = model_name or "exaone"
    base = default_config or GenerationConfig(max_new_tokens=DEFAULT_MAX_NEW_TOKENS)
    tokenizer, mconf = engine.tokenizer, engine.model.config
    context = mconf.max_position_embeddings
    if getattr(engine, "max_seq_len", None):
        context = min(context, engine.max_seq_len)
    vocab = min(mconf.vocab_size, tokenizer.vocab_size) if tokenizer is not None else mconf.vocab_size
    metrics = Metrics()
    scheduler = Scheduler(engine, max_batch, 4 * max_batch if max_waiting is None else max_waiting, metrics)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            await run_in_threadpool(scheduler.stop)

    app = FastAPI(title="exaone_ext", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.metrics, app.state.model_name = scheduler, metrics, model_name
    app.state.context_length = context

    # ------------------------------------------------------------ errors in OpenAI's shape
    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError):
        return _error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(error.status_code, str(error.detail), type=kind).body(),
                            status_code=error.status_code, headers=getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError):
        return _error_response(proto.bad(str(error)))

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided" if header else
                           "Missing API key: send 'Authorization: Bearer <key>'",
                           type="invalid_request_error", code="invalid_api_key")

    async def read_json(request: Request):
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise APIError(413, f"The request body is {declared} bytes; the limit is {max_body_bytes} bytes",
                           code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                raise APIError(413, f"The request body is over the limit of {max_body_bytes} bytes",
                               code="request_too_large")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise proto.bad(f"The request body is not valid JSON ({e})") from None

    # ------------------------------------------------------------ the engine side of a request
    async def admit(parsed: proto.ParsedRequest) -> tuple[Stream, int]:
        """Tokenize, check against the context, queue, and wait for the engine to take it."""
        if isinstance(parsed.prompt, list) and parsed.prompt and isinstance(parsed.prompt[0], dict):
            ids = await run_in_threadpool(tokenizer.apply_chat_template, parsed.prompt, True, True)
        elif isinstance(parsed.prompt, str):
            ids = await run_in_threadpool(tokenizer.encode, parsed.prompt)
        else:
            ids = list(parsed.prompt)
        if not ids:
            raise proto.bad("prompt: has no tokens", "prompt")
        config = proto.build_config(base, parsed, len(ids), context, vocab, ids)
        stream = scheduler.submit(ids, config, len(ids))
        try:
            first = await stream.queue.get()
        except BaseException:  # cancelled while queued (shutdown, client gone): give the slot back
            scheduler.cancel(stream)
            raise
        if isinstance(first, APIError):
            raise first
        assert first is ACCEPTED, first
        return stream, len(ids)

    async def events(request: Request, stream: Stream) -> AsyncIterator:
        """The stream's events until the last; cancels the request if the client goes away first."""
        async def disconnected():
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watch = asyncio.ensure_future(disconnected())
        try:
            while True:
                get = asyncio.ensure_future(stream.queue.get())
                await asyncio.wait({get, watch}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    return
                item = get.result()
                if isinstance(item, APIError):
                    raise item
                if item.token_ids and not hasattr(stream, "first_token_at"):
                    stream.first_token_at = time.monotonic()
                    metrics.first_token(stream.first_token_at - stream.submitted)
                yield item
                if item.finished:
                    return
        finally:
            watch.cancel()
            if not stream.finished:
                scheduler.cancel(stream)

    def finish_reason(event) -> str:
        return proto.FINISH_REASONS.get(event.request.stop_reason, "stop")

    async def answer(request: Request, endpoint: str, parse) -> Response:
        status = 500
        try:
            check_key(request)
            parsed = parse(await read_json(request), model_name)
            stream, prompt_tokens = await admit(parsed)
            status = 200
            if parsed.stream:
                return StreamingResponse(sse(request, endpoint, parsed, stream, prompt_tokens),
                                         media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            text, last = [], None
            async for event in events(request, stream):
                text.append(event.text)
                last = event
            if last is None:  # the client left; nobody reads this
                return Response(status_code=499)
            rid = proto.new_id("chatcmpl" if endpoint == "chat" else "cmpl")
            build = proto.chat_response if endpoint == "chat" else proto.completion_response
            return JSONResponse(build(rid, model_name, "".join(text), finish_reason(last), prompt_tokens,
                                      len(last.request.tokens)))
        except APIError as e:
            status = e.status
            return _error_response(e)
        finally:
            metrics.request_done(endpoint, status)

    async def sse(request: Request, endpoint: str, parsed: proto.ParsedRequest, stream: Stream,
                  prompt_tokens: int) -> AsyncIterator[str]:
        chat = endpoint == "chat"
        rid, now = proto.new_id("chatcmpl" if chat else "cmpl"), int(time.time())

        def data(obj) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        if chat:
            yield data(proto.chat_chunk(rid, now, model_name, {"role": "assistant", "content": ""}))
        try:
            async for event in events(request, stream):
                finish = finish_reason(event) if event.finished else None
                if event.text or finish:
                    if chat:
                        delta = {"content": event.text} if event.text else {}
                        yield data(proto.chat_chunk(rid, now, model_name, delta, finish))
                    else:
                        yield data(proto.completion_chunk(rid, now, model_name, event.text, finish))
                if event.finished and parsed.include_usage:
                    u = proto.usage(prompt_tokens, len(event.request.tokens))
                    yield data(proto.chat_chunk(rid, now, model_name, None, usage_=u) if chat
                               else proto.completion_chunk(rid, now, model_name, None, usage_=u))
        except APIError as e:  # the engine failed mid-stream: the error goes out as an event
            yield data(e.body())
        yield "data: [DONE]\n\n"

    # ------------------------------------------------------------ routes
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answer(request, "chat", proto.parse_chat)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, "completions", proto.parse_completion)

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "exaone_ext",
                "max_model_len": context}

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        check_key(request)
        if model_id != model_name:
            raise APIError(404, f"The model {model_id!r} does not exist", param="model", code="model_not_found")
        return model_card()

    @app.get("/health")
    async def health():
        if not scheduler.alive:
            return JSONResponse({"status": "error", "error": repr(scheduler.error)}, status_code=503)
        return {"status": "ok", "model": model_name, "running": metrics.running, "waiting": metrics.waiting}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
