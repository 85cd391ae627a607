"""The clients against a real Herald: publish, batches, kick, listing, runs,
bad input, retries that reuse the idempotency key."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from herald_gateway import AsyncHerald, Herald, HeraldError, TextStreamError

from conftest import API_KEY, covered, events, join_deltas


def test_publish_batch_kick_and_listing(herald_server):
    ws = herald_server.ws("alice")
    with Herald(herald_server.url, API_KEY) as h:
        p = h.publish("alice", "note", data={"n": 1}, thread_id="t1")
        assert (p.seq, p.delivered, p.duplicate) == (1, 1, False)
        got = events(ws, 1)[0]
        assert (got["seq"], got["event"], got["data"], got["thread_id"]) == (1, "note", {"n": 1}, "t1")

        many = h.publish_many(
            [{"user_id": "alice", "event": "a"}, {"user_id": "alice", "event": "b"}]
        )
        assert [m.seq for m in many] == [2, 3]
        assert [e["event"] for e in events(ws, 2)] == ["a", "b"]

        rows = h.connections("alice")
        assert len(rows) == 1 and rows[0]["user_id"] == "alice"
        assert h.disconnect("alice") == 1
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                ws.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4409


def test_a_run_streams_the_golden_path(herald_server):
    ws = herald_server.ws("bob")
    with Herald(herald_server.url, API_KEY) as h:
        with h.run("bob", thread_id="t1") as run:
            run.thinking("hmm")
            with run.tool("search", {"q": "x"}) as call:
                call.result = {"hits": 2}
            run.complete("the answer")
    got = events(ws, 5)
    assert [e["event"] for e in got] == [
        "agent_started",
        "agent_thinking",
        "tool_executing",
        "tool_completed",
        "agent_completed",
    ]
    assert {e["run_id"] for e in got} == {run.run_id}
    assert got[3]["data"] == {"tool": "search", "tool_call_id": call.id, "output": {"hits": 2}}
    assert got[2]["data"]["tool_call_id"] == call.id and call.id.startswith("call_")
    assert got[4]["data"] == {"final_response": "the answer"}


def test_parallel_calls_of_one_tool_are_paired_by_tool_call_id(herald_server):
    ws = herald_server.ws("dee")
    with Herald(herald_server.url, API_KEY) as h:
        with h.run("dee") as run:
            with run.tool("search", {"q": "a"}) as first:
                with run.tool("search", {"q": "b"}, call_id="mine") as second:
                    second.result = "b"
                first.result = "a"
    got = events(ws, 6)
    ids = [(e["event"], e["data"].get("tool_call_id")) for e in got[1:5]]
    assert ids == [
        ("tool_executing", first.id),
        ("tool_executing", "mine"),
        ("tool_completed", "mine"),
        ("tool_completed", first.id),
    ]
    assert first.id != "mine"
    assert got[4]["data"]["output"] == "a"


def test_a_run_that_raises_ends_with_agent_error(herald_server):
    ws = herald_server.ws("cy")
    with Herald(herald_server.url, API_KEY) as h:
        with pytest.raises(ValueError, match="boom"):
            with h.run("cy") as run:
                with run.tool("calc") as call:
                    raise ValueError("boom")
    got = events(ws, 4)
    assert [e["event"] for e in got] == [
        "agent_started",
        "tool_executing",
        "tool_completed",
        "agent_error",
    ]
    assert got[2]["data"]["error"] == {"type": "ValueError", "message": "boom"}
    assert got[3]["data"] == {"error": "ValueError", "message": "boom"}
    assert call.result is None


def test_a_cancelled_async_run_ends_with_agent_cancelled(herald_server):
    ws = herald_server.ws("dee")

    async def main() -> None:
        async with AsyncHerald(herald_server.url, API_KEY) as h:
            started = asyncio.Event()

            async def agent() -> None:
                async with h.run("dee") as run:
                    await run.thinking("working")
                    started.set()
                    await asyncio.sleep(30)

            task = asyncio.create_task(agent())
            await started.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())
    assert [e["event"] for e in events(ws, 3)] == [
        "agent_started",
        "agent_thinking",
        "agent_cancelled",
    ]


class _HoldsAnswerOf(httpx.AsyncBaseTransport):
    """Delivers the publish of `event` to Herald, then holds its answer: the
    task is cancelled while Herald has the event and the agent does not know."""

    def __init__(self, event: str) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.event = event
        self.held = asyncio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        response = await self.inner.handle_async_request(request)
        if not self.held.is_set() and json.loads(request.content).get("event") == self.event:
            await response.aread()
            self.held.set()
            await asyncio.sleep(30)
        return response


@pytest.mark.parametrize(
    "held, closing",
    [
        ("agent_started", ["agent_started", "agent_cancelled"]),
        ("tool_executing", ["agent_started", "tool_executing", "tool_completed", "agent_cancelled"]),
    ],
)
def test_a_run_cancelled_while_its_opening_event_is_in_flight_still_closes(herald_server, held, closing):
    ws = herald_server.ws("dan")

    async def main() -> None:
        transport = _HoldsAnswerOf(held)
        async with AsyncHerald(herald_server.url, API_KEY, transport=transport) as h:

            async def agent() -> None:
                async with h.run("dan") as run:
                    async with run.tool("search"):
                        await asyncio.sleep(30)

            task = asyncio.create_task(agent())
            await asyncio.wait_for(transport.held.wait(), 10)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())
    got = events(ws, len(closing))
    assert [e["event"] for e in got] == closing
    if held == "tool_executing":
        assert got[2]["data"]["error"]["type"] == "CancelledError"


def test_bad_input_names_the_field(herald_server):
    with Herald(herald_server.url, API_KEY) as h:
        with pytest.raises(HeraldError) as e:
            h.publish("u", "")
        assert (e.value.status, e.value.code, e.value.field) == (400, "invalid_field", "event")
        with pytest.raises(HeraldError) as e:
            h.publish("u", "note", thread_id=5)  # type: ignore[arg-type]
        assert (e.value.status, e.value.field) == (400, "thread_id")
    with Herald(herald_server.url, "wrong-key") as h:
        with pytest.raises(HeraldError) as e:
            h.publish("u", "note")
        assert (e.value.status, e.value.code) == (401, "unauthorized")


class TimesOutOnce(httpx.BaseTransport):
    """Delivers the first request to the server, then reports a timeout (the
    answer was lost on the way back); later requests pass through."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.bodies: list = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.bodies.append(json.loads(request.content))
        response = self.inner.handle_request(request)
        if len(self.bodies) == 1:
            response.read()
            raise httpx.ReadTimeout("lost answer", request=request)
        return response


def test_a_retry_after_a_lost_answer_does_not_duplicate(herald_server):
    transport = TimesOutOnce()
    ws = herald_server.ws("eve")
    with Herald(herald_server.url, API_KEY, transport=transport) as h:
        p = h.publish("eve", "note")
        assert (p.seq, p.duplicate) == (1, True), "the retry found the stored event"
        assert transport.bodies[0]["idempotency_key"] == transport.bodies[1]["idempotency_key"]
        assert h.publish("eve", "note").seq == 2, "one seq was used, not two"
    assert [e["seq"] for e in events(ws, 2)] == [1, 2]


WORDS = [f"w{i} " if i % 5 else "\"é😀\"\n" for i in range(120)]


def test_run_text_streams_the_answer_in_order_before_the_next_event(herald_server):
    ws = herald_server.ws("tia")
    with Herald(herald_server.url, API_KEY) as h:
        with h.run("tia") as run:
            for w in WORDS[:60]:
                run.text(w)
            with run.tool("search", {"q": "x"}) as call:
                call.result = 1
            for w in WORDS[60:]:
                run.text(w, part="final")
    got = join_deltas(covered(ws, 1 + 60 + 2 + 60 + 1))
    assert [(e["event"], e.get("from_seq", e["seq"]), e["seq"]) for e in got] == [
        ("agent_started", 1, 1),
        ("agent_text_delta", 2, 61),
        ("tool_executing", 62, 62),
        ("tool_completed", 63, 63),
        ("agent_text_delta", 64, 123),
        ("agent_completed", 124, 124),
    ]
    assert (got[1]["data"], got[4]["data"]) == (
        {"part": "answer", "text": "".join(WORDS[:60])},
        {"part": "final", "text": "".join(WORDS[60:])},
    )


class _LoseFirstTextAnswer(httpx.BaseTransport):
    """Breaks the first text stream after its first chunk: that chunk reaches
    Herald and the answer is lost (`deliver`), or the chunk is lost too."""

    def __init__(self, deliver: bool) -> None:
        self.inner = httpx.HTTPTransport()
        self.deliver = deliver
        self.lost = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/text") and not self.lost:
            first = next(iter(request.stream))  # type: ignore[arg-type]
            self.lost = first.count(b"\n")
            if self.deliver:
                sent = httpx.Request(
                    "POST", request.url, headers={"Authorization": request.headers["Authorization"]}, content=first
                )
                assert self.inner.handle_request(sent).status_code == 200
            raise httpx.ReadError("connection lost")
        return self.inner.handle_request(request)


@pytest.mark.parametrize("delivered", [True, False])
def test_a_lost_text_stream_is_retried_without_a_gap_or_a_repeat(herald_server, delivered):
    ws = herald_server.ws("uma")
    transport = _LoseFirstTextAnswer(delivered)
    with Herald(herald_server.url, API_KEY, transport=transport) as h:
        with h.run("uma") as run:
            for w in WORDS:
                run.text(w)
    assert transport.lost >= 1
    got = join_deltas(covered(ws, 1 + len(WORDS) + 1))
    assert [(e["event"], e.get("from_seq", e["seq"]), e["seq"]) for e in got] == [
        ("agent_started", 1, 1),
        ("agent_text_delta", 2, len(WORDS) + 1),
        ("agent_completed", len(WORDS) + 2, len(WORDS) + 2),
    ]
    assert got[1]["data"] == {"part": "answer", "text": "".join(WORDS)}


def test_async_run_text_streams_and_a_refused_stream_fails_the_run(herald_server):
    ws = herald_server.ws("val")

    async def main() -> None:
        async with AsyncHerald(herald_server.url, API_KEY) as h:
            async with h.run("val") as run:
                for w in WORDS:
                    run.text(w)
                    await asyncio.sleep(0)
                run.complete("done")
        # A part id over 128 bytes is refused (400): the run ends with
        # agent_error, and the block raises (the answer did not go out).
        async with AsyncHerald(herald_server.url, API_KEY) as h:
            with pytest.raises(TextStreamError):
                async with h.run("val") as run:
                    run.text("x", part="p" * 200)

    asyncio.run(main())
    got = join_deltas(covered(ws, 1 + len(WORDS) + 1 + 2))
    assert [(e["event"], e.get("from_seq", e["seq"]), e["seq"]) for e in got] == [
        ("agent_started", 1, 1),
        ("agent_text_delta", 2, len(WORDS) + 1),
        ("agent_completed", len(WORDS) + 2, len(WORDS) + 2),
        ("agent_started", len(WORDS) + 3, len(WORDS) + 3),
        ("agent_error", len(WORDS) + 4, len(WORDS) + 4),
    ]
    assert got[1]["data"] == {"part": "answer", "text": "".join(WORDS)}
    assert got[0]["run_id"] == got[1]["run_id"] == got[2]["run_id"] != got[3]["run_id"] == got[4]["run_id"]
    assert got[-1]["data"]["error"] == "TextStreamError"
    assert "invalid_line" in got[-1]["data"]["message"]
