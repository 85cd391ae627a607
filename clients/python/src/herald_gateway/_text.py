"""A run's answer text streamed to Herald over one long request per segment.

``run.text(delta)`` numbers each delta within its part and queues it; a
sender (a thread, or an asyncio task) keeps one
``POST /api/v1/runs/{run_id}/text`` open and writes whatever is queued as one
chunk of newline-delimited deltas, so a token costs a line, not a request.
The request ends — and every delta is confirmed — when the run publishes
any other event (so events keep their order), when the run ends, or when it
carries :data:`MAX_ATTEMPT_LINES` lines (the next request goes on from there).

If a request fails (connection lost, timeout, 5xx, the server draining), the
sender first asks Herald where each part with unconfirmed deltas stands (a
probe: one delta numbered :data:`PROBE_INDEX`, far ahead of any real one, is
refused 409 ``delta_out_of_order`` with the part's next index as
``expected``, and appends nothing), drops what Herald has, and sends again
only the rest. Numbered deltas keep this safe even when a probe is not
exact: Herald skips what it already has, so none is appended twice.

An attempt's timeouts fit what it carries: Herald publishes at most
:data:`RATE` deltas a second per request, so waiting for it to read (write)
or to answer (read) may take ``lines / RATE``. Both get the client's base
timeout plus ``MARGIN * lines / RATE``: for the write, ``lines`` is the
attempt's bound (a write may wait while Herald works through what is ahead
of it); for the answer, the lines the attempt actually carried.

When the text cannot be delivered (Herald refused a line, or the retries ran
out) the error is kept as a :class:`TextStreamError`: the next ``run.text``
raises it, and so does the run's end, after it published ``agent_error``.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
from typing import (
    TYPE_CHECKING,
    Any,
    AsyncIterator,
    Callable,
    Dict,
    Iterator,
    List,
    MutableMapping,
    Optional,
    Tuple,
    Type,
)
from urllib.parse import quote, urlencode

import httpx

from ._errors import TextStreamError
from ._retry import RETRIES, delay, error_of

if TYPE_CHECKING:
    from ._client import AsyncHerald, Herald

#: Deltas Herald publishes per second, per request (after a burst of as many).
RATE = 2000
#: How much longer than ``lines / RATE`` an attempt may take.
MARGIN = 1.5
#: Most lines one request carries (resent and new): its worst case is
#: ``MAX_ATTEMPT_LINES / RATE`` = 10 s of Herald's time, so an attempt's
#: timeouts stay bounded, and so does what a failure makes the SDK resend.
MAX_ATTEMPT_LINES = 20_000
#: The index of a probe: far ahead of any real delta, so Herald refuses it
#: with the part's next index, and exact as a JSON number everywhere.
PROBE_INDEX = 2**53

#: A queued delta: its part, its index within the part, and its line.
_Item = Tuple[str, int, str]


def budget(base: Optional[float], lines: int) -> Optional[float]:
    """The timeout of an attempt that carries ``lines`` lines (``None``: none)."""
    if base is None:
        return None
    return base + MARGIN * lines / RATE


def path_segment(value: str) -> str:
    """``value`` as one URL path segment, whatever it holds (``/``, ``?``,
    ``#``, ``%``, spaces, non-ASCII; ``.`` and ``..``, which a URL would
    otherwise resolve away)."""
    segment = quote(value, safe="")
    if segment in (".", ".."):
        segment = segment.replace(".", "%2E")
    return segment


def _retryable(response: Optional[httpx.Response]) -> bool:
    # 408: the stream was idle; 409: a delta ahead of Herald (locate, resend).
    return response is None or response.status_code >= 500 or response.status_code in (408, 409, 429)


def _expected(response: httpx.Response) -> Optional[int]:
    """A probe's answer: the part's next index, or ``None`` when the answer
    is not the refusal a probe expects."""
    if response.status_code != 409:
        return None
    try:
        body = response.json()
    except ValueError:
        return None
    if not isinstance(body, dict) or body.get("error") != "delta_out_of_order":
        return None
    expected = body.get("expected")
    if type(expected) is not int or expected < 0:
        return None
    return expected


class _Stream:
    """What both senders share: the request, the deltas numbered per part,
    the lines not yet confirmed, and what an answer means."""

    def __init__(
        self,
        base: Optional[float],
        user_id: Optional[str],
        run_id: str,
        thread_id: Optional[str],
        stream: Optional[str] = None,
    ) -> None:
        # The run's stream: the user's own, or a shared one (``?stream=``).
        params: Dict[str, str] = (
            {"stream": stream} if stream is not None else {"user_id": user_id or ""}
        )
        if thread_id is not None:
            params["thread_id"] = thread_id
        # Caller-given values, escaped: the run id as one path segment, the
        # rest as query values.
        self._url = f"/api/v1/runs/{path_segment(run_id)}/text?{urlencode(params)}"
        self._run_id = run_id
        self._base = base
        self._next: Dict[str, int] = {}
        #: Deltas sent (or being sent) and not confirmed by an answer, in order.
        self._pending: List[_Item] = []
        self._error: Optional[TextStreamError] = None
        #: Failed attempts in a row.
        self._failures = 0

    def _item(self, part: str, text: str) -> _Item:
        index = self._next.get(part, 0)
        self._next[part] = index + 1
        line = json.dumps({"part": part, "index": index, "text": text}, ensure_ascii=False) + "\n"
        return part, index, line

    def _take(
        self,
        item: Optional[_Item],
        get_nowait: Callable[[], Optional[_Item]],
        empty: Type[Exception],
        room: int,
    ) -> Tuple[Optional[bytes], int, bool]:
        """One chunk of the body: ``item`` and whatever else is queued, up to
        the end marker or ``room`` lines; returns it (``None`` when empty),
        its lines, and whether the end came."""
        chunk: List[str] = []
        done = False
        while True:
            if item is None:
                done = True
                break
            chunk.append(item[2])
            self._pending.append(item)
            if len(chunk) >= room:
                break
            try:
                item = get_nowait()
            except empty:
                break
        return ("".join(chunk).encode() if chunk else None), len(chunk), done

    def _resend(self) -> Optional[bytes]:
        if not self._pending:
            return None
        return "".join(line for _, _, line in self._pending).encode()

    def _timeouts(self) -> Dict[str, Any]:
        """An attempt's timeouts, before it is known how many lines it carries
        (the answer's is lowered to fit them when its body ends)."""
        most = budget(self._base, MAX_ATTEMPT_LINES)
        return httpx.Timeout(self._base, read=most, write=most).as_dict()

    def _carried(self, timeouts: MutableMapping[str, Any], lines: int) -> None:
        """The body ended after ``lines`` lines: the wait for the answer fits
        them (the request's timeouts are read per phase, the answer's after
        the body was sent)."""
        timeouts["read"] = budget(self._base, lines)

    def _probes(self) -> List[Tuple[str, bytes]]:
        """A probe for each part with unconfirmed deltas, in order."""
        parts = dict.fromkeys(part for part, _, _ in self._pending)
        return [
            (
                part,
                (json.dumps({"part": part, "index": PROBE_INDEX, "text": ""}, ensure_ascii=False) + "\n").encode(),
            )
            for part in parts
        ]

    def _trim(self, part: str, response: httpx.Response) -> Optional[httpx.Response]:
        """Drop ``part``'s deltas that Herald has, from a probe's answer;
        returns the answer when it is not the expected refusal (a failure)."""
        expected = _expected(response)
        if expected is None:
            return response
        first = next(index for p, index, _ in self._pending if p == part)
        if expected < first:
            raise TextStreamError(
                409,
                "delta_out_of_order",
                f"Herald expects delta {expected} of part {part!r}, but deltas up to "
                f"{first - 1} were confirmed: the part was reset (its run closed?)",
                run_id=self._run_id,
            )
        self._pending = [item for item in self._pending if item[0] != part or item[1] >= expected]
        return None

    def _settle(
        self,
        response: Optional[httpx.Response],
        error: Optional[BaseException],
        posted: bool,
        done: bool,
    ) -> Optional[float]:
        """After an attempt (``posted``: the deltas were sent, not only
        probes): ``None`` when finished (all confirmed, or given up with the
        error kept), else the wait before the next attempt."""
        if self._error is not None:
            return None
        if posted and response is not None and response.status_code == 200:
            self._pending.clear()
            self._failures = 0
            # A full request was confirmed: the next one goes on at once.
            return None if done else 0.0
        self._failures += 1
        if not _retryable(response) or self._failures > RETRIES:
            self._error = TextStreamError.of(error_of(response, error), self._run_id)
            return None
        return delay(self._failures - 1)

    def _raise_kept(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error


class TextStream(_Stream):
    """The blocking client's text stream of one run (see :meth:`Run.text`)."""

    def __init__(
        self,
        client: "Herald",
        user_id: Optional[str],
        run_id: str,
        thread_id: Optional[str],
        stream: Optional[str] = None,
    ) -> None:
        super().__init__(client._timeout, user_id, run_id, thread_id, stream)
        self._client = client
        self._queue: "queue.Queue[Optional[_Item]]" = queue.Queue()
        self._sender: Optional[threading.Thread] = None

    def text(self, delta: str, part: str) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(self._item(part, delta))
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

    def _body(self, done: List[bool], timeouts: MutableMapping[str, Any]) -> Iterator[bytes]:
        resend = self._resend()
        sent = len(self._pending)
        if resend:
            yield resend
        while not done[0] and sent < MAX_ATTEMPT_LINES:
            item = self._queue.get()
            chunk, lines, done[0] = self._take(
                item, self._queue.get_nowait, queue.Empty, MAX_ATTEMPT_LINES - sent
            )
            sent += lines
            if chunk:
                yield chunk
        self._carried(timeouts, sent)

    def _post(self, done: List[bool]) -> httpx.Response:
        """One attempt: the unconfirmed deltas, then new ones as they come."""
        http = self._client._http
        timeouts = self._timeouts()
        request = http.build_request("POST", self._url, content=self._body(done, timeouts))
        request.extensions["timeout"] = timeouts
        return http.send(request)

    def _locate(self) -> Optional[httpx.Response]:
        """Probe where each part stands and drop what Herald has; a failed
        probe's answer, or ``None``."""
        for part, probe in self._probes():
            response = self._client._http.post(self._url, content=probe)
            failed = self._trim(part, response)
            if failed is not None:
                return failed
        return None

    def _send(self) -> None:
        done = [False]
        self._failures = 0
        while True:
            response: Optional[httpx.Response] = None
            error: Optional[BaseException] = None
            posted = False
            try:
                if self._failures:
                    response = self._locate()
                if response is None:
                    posted = True
                    response = self._post(done)
            except (httpx.TimeoutException, httpx.TransportError) as e:
                error = e
            except TextStreamError as e:
                self._error = e
            wait = self._settle(response, error, posted, done[0])
            if wait is None:
                # Finished, or given up: then take what is queued, up to the
                # end, and drop it.
                while not done[0]:
                    done[0] = self._queue.get() is None
                return
            if wait:
                time.sleep(wait)


class AsyncTextStream(_Stream):
    """The asyncio client's text stream of one run (see :meth:`AsyncRun.text`)."""

    def __init__(
        self,
        client: "AsyncHerald",
        user_id: Optional[str],
        run_id: str,
        thread_id: Optional[str],
        stream: Optional[str] = None,
    ) -> None:
        super().__init__(client._timeout, user_id, run_id, thread_id, stream)
        self._client = client
        self._queue: "asyncio.Queue[Optional[_Item]]" = asyncio.Queue()
        self._sender: "Optional[asyncio.Task[None]]" = None

    def text(self, delta: str, part: str) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put_nowait(self._item(part, delta))
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

    async def _body(self, done: List[bool], timeouts: MutableMapping[str, Any]) -> AsyncIterator[bytes]:
        resend = self._resend()
        sent = len(self._pending)
        if resend:
            yield resend
        while not done[0] and sent < MAX_ATTEMPT_LINES:
            item = await self._queue.get()
            chunk, lines, done[0] = self._take(
                item, self._queue.get_nowait, asyncio.QueueEmpty, MAX_ATTEMPT_LINES - sent
            )
            sent += lines
            if chunk:
                yield chunk
        self._carried(timeouts, sent)

    async def _post(self, done: List[bool]) -> httpx.Response:
        """One attempt: the unconfirmed deltas, then new ones as they come."""
        http = self._client._http
        timeouts = self._timeouts()
        request = http.build_request("POST", self._url, content=self._body(done, timeouts))
        request.extensions["timeout"] = timeouts
        return await http.send(request)

    async def _locate(self) -> Optional[httpx.Response]:
        """Probe where each part stands (see :meth:`TextStream._locate`)."""
        for part, probe in self._probes():
            response = await self._client._http.post(self._url, content=probe)
            failed = self._trim(part, response)
            if failed is not None:
                return failed
        return None

    async def _send(self) -> None:
        done = [False]
        self._failures = 0
        while True:
            response: Optional[httpx.Response] = None
            error: Optional[BaseException] = None
            posted = False
            try:
                if self._failures:
                    response = await self._locate()
                if response is None:
                    posted = True
                    response = await self._post(done)
            except (httpx.TimeoutException, httpx.TransportError) as e:
                error = e
            except TextStreamError as e:
                self._error = e
            wait = self._settle(response, error, posted, done[0])
            if wait is None:
                while not done[0]:
                    done[0] = await self._queue.get() is None
                return
            if wait:
                await asyncio.sleep(wait)
