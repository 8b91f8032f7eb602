"""The thread that owns the engine.

HTTP handlers never touch the engine: they hand a Stream to Scheduler.submit() and read its
asyncio queue. The thread applies the adds and cancels that came in since its last step, calls
engine.step() (newcomers prefilled into free rows, in the decode pass of the running rows or,
with none running, in a pass of their own whose first tokens are pushed at once; one token for
every row), and pushes each event to its request's queue with
loop.call_soon_threadsafe. Queues are unbounded, so decoding never waits for a slow reader; a
reader that goes away cancels its request and the row is free at the next step.

Queue items: Accepted (engine.add took the request), an Event (text and tokens; .finished on the
last), or an APIError (refused, or the engine failed).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque

from .metrics import Metrics
from .protocol import APIError

log = logging.getLogger("exaone_ext.serve")


class Accepted:
    """First queue item of a request the engine took."""


ACCEPTED = Accepted()


class Overloaded(APIError):
    def __init__(self, capacity: int):
        super().__init__(503, f"The server is busy: {capacity} requests are running or queued. Retry later.",
                         type="server_error", code="overloaded")


class Stream:
    """One request's channel from the engine thread to the event loop."""

    def __init__(self, prompt, config, prompt_tokens: int, loop: asyncio.AbstractEventLoop):
        self.prompt, self.config, self.prompt_tokens = prompt, config, prompt_tokens
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.request = None            # the engine's Request, set by the engine thread
        self.submitted = time.monotonic()
        self.finished = False          # set by the engine thread with the last event
        self.cancelled = False

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop has closed (shutdown): nobody is reading
            pass


class Scheduler:
    """Runs `engine` in a thread. At most max_batch + max_waiting requests are held at once
    (running or queued); a request beyond that is refused with 503."""

    def __init__(self, engine, max_batch: int, max_waiting: int, metrics: Metrics | None = None):
        self.engine = engine
        self.capacity = max_batch + max_waiting
        self.metrics = metrics or Metrics()
        self._cond = threading.Condition()
        self._commands: deque[tuple[str, Stream]] = deque()
        self._held = 0                        # requests submitted and not yet finished or cancelled
        self._streams: dict[int, Stream] = {}  # engine request id -> stream (engine thread only)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None  # set if the loop itself died

    # ---------------------------------------------------------------- event-loop side
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="exaone-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def held(self) -> int:
        return self._held

    def submit(self, prompt, config, prompt_tokens: int) -> Stream:
        """Queue a request (called on the event loop). Raises Overloaded when the queue is full."""
        stream = Stream(prompt, config, prompt_tokens, asyncio.get_running_loop())
        with self._cond:
            if self._stopping:
                raise APIError(503, "The server is shutting down", type="server_error", code="shutting_down")
            if self._held >= self.capacity:
                raise Overloaded(self.capacity)
            self._held += 1
            self._commands.append(("add", stream))
            self._cond.notify()
        return stream

    def cancel(self, stream: Stream) -> None:
        """The client went away: free the request's row at the next step (idempotent)."""
        with self._cond:
            if stream.cancelled:
                return
            stream.cancelled = True
            self._commands.append(("cancel", stream))
            self._cond.notify()

    # ---------------------------------------------------------------- engine thread
    def _release(self, stream: Stream) -> None:
        with self._cond:
            self._held -= 1

    def _apply(self, kind: str, stream: Stream) -> None:
        if kind == "add":
            if stream.cancelled:  # gone before it was added; the cancel command that follows is a no-op
                self._release(stream)
                return
            try:
                stream.request = self.engine.add(stream.prompt, stream.config)
            except (ValueError, TypeError) as e:
                self._release(stream)
                stream.finished = True
                stream.put(APIError(400, str(e)))
                return
            self._streams[stream.request.id] = stream
            self.metrics.admitted(stream.prompt_tokens)
            stream.put(ACCEPTED)
        elif stream.request is not None and self._streams.pop(stream.request.id, None) is not None:
            try:
                self.engine.cancel(stream.request)
            except (ValueError, TypeError):  # already gone from the engine: nothing to free
                log.exception("cancel refused")
            self._release(stream)

    def _deliver(self, events, counts: list[int]) -> None:
        """Each event to its request's stream; counts += [requests stopped, tokens]."""
        for event in events:
            counts[1] += len(event.token_ids)
            if event.finished and event.request.stop_reason != "cancelled":
                counts[0] += 1
            stream = self._streams.get(event.request.id)
            if stream is None:  # cancelled: the client is gone
                continue
            if event.finished:
                del self._streams[event.request.id]
                stream.finished = True
                self._release(stream)
            stream.put(event)

    def _fail_all(self, error: BaseException) -> None:
        """The engine raised: every request it holds is answered with a 500 and cancelled."""
        log.exception("engine step failed", exc_info=error)
        for stream in list(self._streams.values()):
            try:
                self.engine.cancel(stream.request)
            except Exception:  # noqa: BLE001 (the engine is already broken; the error goes out below)
                pass
            stream.finished = True
            stream.put(APIError(500, f"the engine failed: {type(error).__name__}: {error}", type="server_error"))
            self._release(stream)
        self._streams.clear()

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                with self._cond:
                    while not self._commands and not self._stopping and not engine.has_work:
                        self._cond.wait()
                    if self._stopping:
                        break
                    commands = list(self._commands)
                    self._commands.clear()
                for kind, stream in commands:
                    self._apply(kind, stream)
                if not engine.has_work:
                    self.metrics.step(0, 0, engine.num_active, engine.num_waiting)
                    continue
                counts = [0, 0]  # requests that stopped in this step, tokens
                try:
                    # newcomers' first tokens go out as soon as they are read back (before the decode pass
                    # when they were prefilled in a pass of their own)
                    self._deliver(engine.step(on_admitted=lambda early: self._deliver(early, counts)), counts)
                except Exception as e:  # noqa: BLE001 (answer the clients, keep serving)
                    self._fail_all(e)
                    continue
                # rows decoded in this step: those still running plus those that stopped in it
                self.metrics.step(engine.num_active + counts[0], counts[1], engine.num_active, engine.num_waiting)
        except BaseException as e:  # noqa: BLE001 (recorded for /health; requests answered below)
            self.error = e
            log.exception("engine thread died")
        finally:
            with self._cond:
                self._stopping = True
                leftover = [s for _, s in self._commands if not s.finished]
                self._commands.clear()
            for stream in list(self._streams.values()) + leftover:
                stream.finished = True
                stream.put(APIError(503, "The server is shutting down", type="server_error", code="shutting_down"))
            self._streams.clear()
