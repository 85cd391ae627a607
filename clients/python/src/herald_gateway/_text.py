"""A run's answer text streamed to Herald over one long request per segment.

``run.text(delta)`` numbers each delta within its part and queues it; a
sender (a thread, or an asyncio task) keeps one
``POST /api/v1/runs/{run_id}/text`` open and writes whatever is queued as one
chunk of newline-delimited deltas, so a token costs a line, not a request.
The request ends — and every delta is confirmed — when the run publishes
any other event (so events keep their order) or ends. If the request fails
(connection lost, 5xx, the server draining), it is sent again with every
delta not yet confirmed: Herald skips the numbered deltas it already has, so
none is appended twice.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
from typing import TYPE_CHECKING, AsyncIterator, Dict, Iterator, List, Optional

import httpx

from ._errors import HeraldError

if TYPE_CHECKING:
    from ._client import AsyncHerald, Herald

#: Consecutive failed attempts before a text stream gives up.
RETRIES = 4
BACKOFF = 0.2
MAX_BACKOFF = 2.0


def _line(part: str, index: int, text: str) -> str:
    return json.dumps({"part": part, "index": index, "text": text}, ensure_ascii=False) + "\n"


def _failure(response: Optional[httpx.Response], error: Optional[BaseException]) -> HeraldError:
    if response is None:
        return HeraldError(0, "unreachable", f"Herald did not answer: {error!r}")
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    return HeraldError(
        response.status_code,
        str(body.get("error", "http_error")),
        str(body.get("message", response.text)),
        body.get("field"),
    )


def _retryable(response: Optional[httpx.Response]) -> bool:
    # 408: the stream was idle; 409: resend what is not confirmed.
    return response is None or response.status_code >= 500 or response.status_code in (408, 409, 429)


class _Numbering:
    """Deltas numbered per part, and the lines not yet confirmed."""

    def __init__(self) -> None:
        self.next: Dict[str, int] = {}
        #: Lines sent (or being sent) and not confirmed by an answer, in order.
        self.pending: List[str] = []

    def line(self, part: str, delta: str) -> str:
        index = self.next.get(part, 0)
        self.next[part] = index + 1
        return _line(part, index, delta)


class TextStream:
    """The blocking client's text stream of one run (see :meth:`Run.text`)."""

    def __init__(self, client: "Herald", user_id: str, run_id: str, thread_id: Optional[str]) -> None:
        self._client = client
        self._path = f"/api/v1/runs/{run_id}/text"
        self._params = {"user_id": user_id}
        if thread_id is not None:
            self._params["thread_id"] = thread_id
        self._numbering = _Numbering()
        self._queue: "queue.Queue[Optional[str]]" = queue.Queue()
        self._sender: Optional[threading.Thread] = None
        self._error: Optional[HeraldError] = None

    def text(self, delta: str, part: str) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(self._numbering.line(part, delta))
        if self._sender is None:
            self._sender = threading.Thread(target=self._send, name="herald-text", daemon=True)
            self._sender.start()

    def flush(self) -> None:
        """End the request and wait until every delta is confirmed."""
        if self._sender is None:
            return
        self._queue.put(None)
        self._sender.join()
        self._sender = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _body(self, resend: List[str], done: List[bool]) -> Iterator[bytes]:
        if resend:
            yield "".join(resend).encode()
        while not done[0]:
            item = self._queue.get()
            chunk: List[str] = []
            while True:
                if item is None:
                    done[0] = True
                    break
                chunk.append(item)
                self._numbering.pending.append(item)
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if chunk:
                yield "".join(chunk).encode()

    def _send(self) -> None:
        done = [False]
        failures = 0
        while True:
            resend = list(self._numbering.pending)
            response: Optional[httpx.Response] = None
            error: Optional[BaseException] = None
            try:
                response = self._client._http.post(
                    self._path, params=self._params, content=self._body(resend, done)
                )
            except (httpx.TimeoutException, httpx.TransportError) as e:
                error = e
            if response is not None and response.status_code == 200 and done[0]:
                self._numbering.pending.clear()
                return
            failures += 1
            if not _retryable(response) or failures > RETRIES:
                self._error = _failure(response, error)
                self._drain(done)
                return
            time.sleep(min(BACKOFF * 2 ** (failures - 1), MAX_BACKOFF))

    def _drain(self, done: List[bool]) -> None:
        """After giving up: take what is queued, up to the end, and drop it."""
        while not done[0]:
            if self._queue.get() is None:
                done[0] = True


class AsyncTextStream:
    """The asyncio client's text stream of one run (see :meth:`AsyncRun.text`)."""

    def __init__(
        self, client: "AsyncHerald", user_id: str, run_id: str, thread_id: Optional[str]
    ) -> None:
        self._client = client
        self._path = f"/api/v1/runs/{run_id}/text"
        self._params = {"user_id": user_id}
        if thread_id is not None:
            self._params["thread_id"] = thread_id
        self._numbering = _Numbering()
        self._queue: "asyncio.Queue[Optional[str]]" = asyncio.Queue()
        self._sender: "Optional[asyncio.Task[None]]" = None
        self._error: Optional[HeraldError] = None

    def text(self, delta: str, part: str) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put_nowait(self._numbering.line(part, delta))
        if self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(self._send())

    async def flush(self) -> None:
        """End the request and wait until every delta is confirmed."""
        if self._sender is None:
            return
        self._queue.put_nowait(None)
        sender, self._sender = self._sender, None
        await sender
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    async def _body(self, resend: List[str], done: List[bool]) -> AsyncIterator[bytes]:
        if resend:
            yield "".join(resend).encode()
        while not done[0]:
            item = await self._queue.get()
            chunk: List[str] = []
            while True:
                if item is None:
                    done[0] = True
                    break
                chunk.append(item)
                self._numbering.pending.append(item)
                try:
                    item = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
            if chunk:
                yield "".join(chunk).encode()

    async def _send(self) -> None:
        done = [False]
        failures = 0
        while True:
            resend = list(self._numbering.pending)
            response: Optional[httpx.Response] = None
            error: Optional[BaseException] = None
            try:
                response = await self._client._http.post(
                    self._path, params=self._params, content=self._body(resend, done)
                )
            except (httpx.TimeoutException, httpx.TransportError) as e:
                error = e
            if response is not None and response.status_code == 200 and done[0]:
                self._numbering.pending.clear()
                return
            failures += 1
            if not _retryable(response) or failures > RETRIES:
                self._error = _failure(response, error)
                while not done[0]:
                    if await self._queue.get() is None:
                        done[0] = True
                return
            await asyncio.sleep(min(BACKOFF * 2 ** (failures - 1), MAX_BACKOFF))
