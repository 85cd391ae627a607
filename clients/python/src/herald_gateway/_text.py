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
from typing import TYPE_CHECKING, AsyncIterator, Callable, Dict, Iterator, List, Optional, Tuple, Type

import httpx

from ._errors import HeraldError
from ._retry import RETRIES, delay, error_of

if TYPE_CHECKING:
    from ._client import AsyncHerald, Herald


def _retryable(response: Optional[httpx.Response]) -> bool:
    # 408: the stream was idle; 409: resend what is not confirmed.
    return response is None or response.status_code >= 500 or response.status_code in (408, 409, 429)


class _Stream:
    """What both senders share: the request, the deltas numbered per part,
    the lines not yet confirmed, and what an answer means."""

    def __init__(self, user_id: str, run_id: str, thread_id: Optional[str]) -> None:
        self._path = f"/api/v1/runs/{run_id}/text"
        self._params = {"user_id": user_id}
        if thread_id is not None:
            self._params["thread_id"] = thread_id
        self._next: Dict[str, int] = {}
        #: Lines sent (or being sent) and not confirmed by an answer, in order.
        self._pending: List[str] = []
        self._error: Optional[HeraldError] = None

    def _line(self, part: str, text: str) -> str:
        index = self._next.get(part, 0)
        self._next[part] = index + 1
        return json.dumps({"part": part, "index": index, "text": text}, ensure_ascii=False) + "\n"

    def _take(
        self, item: Optional[str], get_nowait: Callable[[], Optional[str]], empty: Type[Exception]
    ) -> Tuple[Optional[bytes], bool]:
        """One chunk of the body: ``item`` and whatever else is queued, up to
        the end marker; returns it (``None`` when empty) and whether the end came."""
        chunk: List[str] = []
        done = False
        while True:
            if item is None:
                done = True
                break
            chunk.append(item)
            self._pending.append(item)
            try:
                item = get_nowait()
            except empty:
                break
        return ("".join(chunk).encode() if chunk else None), done

    def _settle(
        self,
        response: Optional[httpx.Response],
        error: Optional[BaseException],
        done: bool,
        failures: int,
    ) -> Optional[float]:
        """After one attempt: ``None`` when finished (confirmed, or given up
        with the error kept), else the wait before sending again."""
        if response is not None and response.status_code == 200 and done:
            self._pending.clear()
            return None
        if not _retryable(response) or failures > RETRIES:
            self._error = error_of(response, error)
            return None
        return delay(failures - 1)

    def _raise_kept(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error


class TextStream(_Stream):
    """The blocking client's text stream of one run (see :meth:`Run.text`)."""

    def __init__(self, client: "Herald", user_id: str, run_id: str, thread_id: Optional[str]) -> None:
        super().__init__(user_id, run_id, thread_id)
        self._client = client
        self._queue: "queue.Queue[Optional[str]]" = queue.Queue()
        self._sender: Optional[threading.Thread] = None

    def text(self, delta: str, part: str) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(self._line(part, delta))
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
        self._raise_kept()

    def _body(self, resend: List[str], done: List[bool]) -> Iterator[bytes]:
        if resend:
            yield "".join(resend).encode()
        while not done[0]:
            chunk, done[0] = self._take(self._queue.get(), self._queue.get_nowait, queue.Empty)
            if chunk:
                yield chunk

    def _send(self) -> None:
        done = [False]
        failures = 0
        while True:
            response: Optional[httpx.Response] = None
            error: Optional[BaseException] = None
            try:
                body = self._body(list(self._pending), done)
                response = self._client._http.post(self._path, params=self._params, content=body)
            except (httpx.TimeoutException, httpx.TransportError) as e:
                error = e
            failures += 1
            wait = self._settle(response, error, done[0], failures)
            if wait is None:
                # Given up: take what is queued, up to the end, and drop it.
                while not done[0]:
                    done[0] = self._queue.get() is None
                return
            time.sleep(wait)


class AsyncTextStream(_Stream):
    """The asyncio client's text stream of one run (see :meth:`AsyncRun.text`)."""

    def __init__(
        self, client: "AsyncHerald", user_id: str, run_id: str, thread_id: Optional[str]
    ) -> None:
        super().__init__(user_id, run_id, thread_id)
        self._client = client
        self._queue: "asyncio.Queue[Optional[str]]" = asyncio.Queue()
        self._sender: "Optional[asyncio.Task[None]]" = None

    def text(self, delta: str, part: str) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put_nowait(self._line(part, delta))
        if self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(self._send())

    async def flush(self) -> None:
        """End the request and wait until every delta is confirmed."""
        if self._sender is None:
            return
        self._queue.put_nowait(None)
        sender, self._sender = self._sender, None
        await sender
        self._raise_kept()

    async def _body(self, resend: List[str], done: List[bool]) -> AsyncIterator[bytes]:
        if resend:
            yield "".join(resend).encode()
        while not done[0]:
            chunk, done[0] = self._take(await self._queue.get(), self._queue.get_nowait, asyncio.QueueEmpty)
            if chunk:
                yield chunk

    async def _send(self) -> None:
        done = [False]
        failures = 0
        while True:
            response: Optional[httpx.Response] = None
            error: Optional[BaseException] = None
            try:
                body = self._body(list(self._pending), done)
                response = await self._client._http.post(self._path, params=self._params, content=body)
            except (httpx.TimeoutException, httpx.TransportError) as e:
                error = e
            failures += 1
            wait = self._settle(response, error, done[0], failures)
            if wait is None:
                while not done[0]:
                    done[0] = await self._queue.get() is None
                return
            await asyncio.sleep(wait)
