"""AI SDK chat turns (`chat_request`) answered with the run helper: against a
real Herald, whose `GET /ai` opens the run and signs the webhook, and with an
httpx mock transport for what each kind of run publishes."""

from __future__ import annotations

import asyncio
import json
from typing import Iterator, List

import httpx
import pytest

from herald_gateway import (
    AsyncHerald,
    Cancel,
    ChatRequest,
    Herald,
    UserMessage,
    verify_webhook,
)

from conftest import API_KEY, Hooked as BaseHooked, ai_response, covered, events, join_deltas

HOOK_SECRET = "py-chat-hook-secret-0123456789"
WORDS = ["It ", "is ", "21 ", "°C ", "in ", "\"Oslo\"", ".\n", "😀"]


class Hooked(BaseHooked):
    """The recorder Herald, with each webhook verified as it is taken."""

    def next_event(self):
        headers, body = self.received.get(timeout=10)
        return verify_webhook(HOOK_SECRET, headers, body)


@pytest.fixture
def hooked() -> Iterator[Hooked]:
    h = Hooked(HOOK_SECRET)
    yield h
    h.stop()


def _message(id_: str, role: str, *texts: str) -> dict:
    return {"id": id_, "role": role, "parts": [{"type": "text", "text": t} for t in texts]}


def _send(request_id: str, chat: str, messages: List[dict], **extra: object) -> str:
    frame = {
        "type": "send", "requestId": request_id, "id": chat, "trigger": "submit-message",
        "messages": messages, "headers": {}, "body": {},
    }
    frame.update(extra)
    return json.dumps(frame)


@pytest.mark.parametrize("how", ["the request", "its run id, started"])
def test_a_chat_turn_is_answered_in_heralds_run(hooked, how):
    server = hooked.server
    watcher = server.ws("ada")  # the user's event stream, as /ws sees it
    ai = server.ai("ada")
    messages = [
        _message("m1", "user", "first question"),
        _message("m2", "assistant", "first answer"),
        _message("m3", "user", "what is", "the weather?"),
    ]
    ai.send(_send("r1", "chat-py", messages, body={"model": "small"}, metadata={"tab": 2}))
    event = hooked.next_event()
    assert isinstance(event, ChatRequest)
    assert (event.user_id, event.chat_id, event.thread_id, event.trigger, event.message_id) == (
        "ada", "chat-py", "chat-py", "submit-message", None,
    )
    assert event.run_id.startswith("run_") and len(event.run_id) == 4 + 24
    assert event.messages == messages
    assert (event.body, event.metadata) == ({"model": "small"}, {"tab": 2})
    assert event.text == "what is\nthe weather?"
    assert event.conn_id and event.received_at and event.delivery_id

    with Herald(server.url, API_KEY) as h:
        if how == "the request":
            run = h.run(event)
        else:
            run = h.run(event.user_id, thread_id=event.chat_id, run_id=event.run_id, started=True)
        assert (run.run_id, run.thread_id, run.started) == (event.run_id, "chat-py", True)
        with run:
            run.thinking("Looking it up")
            with run.tool("weather", {"city": "Oslo"}, call_id="call-1") as call:
                call.result = {"celsius": 21}
            for w in WORDS:
                run.text(w)
            run.complete("".join(WORDS))

    # The user's stream: Herald's agent_started, then the answer, all in
    # Herald's run and the chat's thread; one start.
    got = join_deltas(covered(watcher, 1 + 3 + len(WORDS) + 1))
    assert [e["event"] for e in got] == [
        "agent_started", "agent_thinking", "tool_executing", "tool_completed", "agent_text_delta", "agent_completed",
    ]
    assert got[4]["data"] == {"part": "answer", "text": "".join(WORDS)}
    assert got[0]["data"]["source"] == "ai_sdk"
    assert {e["run_id"] for e in got} == {event.run_id}
    assert {e["thread_id"] for e in got} == {"chat-py"}

    # The /ai socket: one response as useChat reads it.
    chunks, last = ai_response(ai, "r1")
    assert last["type"] == "end", last
    kinds = [c["type"] for c in chunks]
    assert kinds[0] == "start" and chunks[0]["messageId"] == event.run_id
    assert kinds.count("start") == 1
    assert kinds[-1] == "finish"
    assert "reasoning-delta" in kinds
    tool = next(c for c in chunks if c["type"] == "tool-input-available")
    assert (tool["toolCallId"], tool["toolName"], tool["input"]) == ("call-1", "weather", {"city": "Oslo"})
    output = next(c for c in chunks if c["type"] == "tool-output-available")
    assert output["output"] == {"celsius": 21}
    text = "".join(c["delta"] for c in chunks if c["type"] == "text-delta")
    assert text == "".join(WORDS)
    ai.close()
    watcher.close()


def test_an_async_chat_turn_stopped_by_the_user_ends_cancelled(hooked):
    server = hooked.server
    watcher = server.ws("bo")
    ai = server.ai("bo")
    ai.send(
        _send("r1", "chat-a", [_message("m1", "user", "old"), _message("m2", "assistant", "x")],
              trigger="regenerate-message", messageId="m2")
    )
    event = hooked.next_event()
    assert isinstance(event, ChatRequest)
    assert (event.trigger, event.message_id, event.text, event.metadata) == (
        "regenerate-message", "m2", "old", None,
    )

    async def main() -> None:
        async with AsyncHerald(server.url, API_KEY) as h:
            started = asyncio.Event()

            async def agent() -> None:
                async with h.run(event) as run:
                    assert (run.run_id, run.thread_id, run.started) == (event.run_id, "chat-a", True)
                    await run.thinking("working")
                    run.text("partial ")
                    await run.thinking("still working")
                    started.set()
                    await asyncio.sleep(30)

            task = asyncio.create_task(agent())
            await asyncio.wait_for(started.wait(), 10)
            # Stop in useChat: an abort of the send, and Herald's cancel webhook.
            ai.send(json.dumps({"type": "abort", "requestId": "r1"}))
            cancel = await asyncio.get_running_loop().run_in_executor(None, hooked.next_event)
            assert isinstance(cancel, Cancel)
            assert (cancel.user_id, cancel.run_id) == ("bo", event.run_id)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())
    got = events(watcher, 5)
    assert [e["event"] for e in got] == [
        "agent_started", "agent_thinking", "agent_text_delta", "agent_thinking", "agent_cancelled",
    ]
    assert {e["run_id"] for e in got} == {event.run_id}
    assert {e["thread_id"] for e in got} == {"chat-a"}
    ai.close()
    watcher.close()


# --- what each kind of run publishes (an httpx mock transport) ---------------


class Recorder:
    """Herald's publish endpoint, recording each event's body."""

    def __init__(self) -> None:
        self.events: List[dict] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/v1/events"
        self.events.append(json.loads(request.content))
        return httpx.Response(200, json={"results": [{"seq": len(self.events), "epoch": "e", "delivered": 0}]})

    def of(self) -> List[tuple]:
        return [(e["event"], e["user_id"], e.get("thread_id"), e.get("run_id")) for e in self.events]


REQUEST = ChatRequest("u1", "chat1", "run_0123456789abcdef01234567", "submit-message", None,
                      [{"id": "m1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}])
MESSAGE = UserMessage("u2", "t2", "m1", "hi")


def test_each_kind_of_run_publishes_its_own_opening():
    rec = Recorder()
    run_id = REQUEST.run_id
    with Herald("http://herald.test", "k", transport=httpx.MockTransport(rec)) as h:
        with h.run(REQUEST):
            pass
        assert rec.of() == [("agent_completed", "u1", "chat1", run_id)]
        rec.events.clear()
        # Asked to, it opens Herald's run again (harmless: Herald shows one start).
        with h.run(REQUEST, started=False):
            pass
        assert rec.of() == [("agent_started", "u1", "chat1", run_id), ("agent_completed", "u1", "chat1", run_id)]
        rec.events.clear()
        # A user message: its user and thread, a new run (or the one given).
        with h.run(MESSAGE) as run:
            pass
        assert run.run_id.startswith("run_") and not run.started
        assert rec.of() == [("agent_started", "u2", "t2", run.run_id), ("agent_completed", "u2", "t2", run.run_id)]
        rec.events.clear()
        with h.run(MESSAGE, run_id="mine"):
            pass
        assert [e[3] for e in rec.of()] == ["mine", "mine"]
        rec.events.clear()
        # A user id and an explicit run Herald opened.
        with h.run("u3", thread_id="c3", run_id="run_x", started=True):
            pass
        assert rec.of() == [("agent_completed", "u3", "c3", "run_x")]
        rec.events.clear()
        # A failure ends Herald's run too.
        with pytest.raises(KeyError):
            with h.run(REQUEST):
                raise KeyError("boom")
        assert [e[0] for e in rec.of()] == ["agent_error"]


def test_an_async_run_of_a_chat_request_does_not_open_it_again():
    rec = Recorder()

    async def main() -> None:
        async with AsyncHerald("http://herald.test", "k", transport=httpx.MockTransport(rec)) as h:
            async with h.run(REQUEST) as run:
                await run.thinking("t")
            assert run.started
            async with h.run(MESSAGE):
                pass

    asyncio.run(main())
    assert [e[0] for e in rec.of()] == ["agent_thinking", "agent_completed", "agent_started", "agent_completed"]
    assert rec.of()[0][1:] == ("u1", "chat1", REQUEST.run_id)


@pytest.mark.parametrize("client", [Herald, AsyncHerald])
def test_a_run_of_an_event_takes_its_ids_from_it(client):
    h = client("http://herald.test", "k")
    with pytest.raises(TypeError):
        h.run(REQUEST, run_id="other")
    with pytest.raises(TypeError):
        h.run(REQUEST, thread_id="other")
    with pytest.raises(TypeError):
        h.run(MESSAGE, thread_id="other")
    with pytest.raises(TypeError):
        h.run(5)  # type: ignore[arg-type]
    run = h.run(REQUEST)
    assert (run.user_id, run.thread_id, run.run_id, run.started) == ("u1", "chat1", REQUEST.run_id, True)
    run = h.run("u", thread_id="t")
    assert (run.user_id, run.thread_id, run.started) == ("u", "t", False)
