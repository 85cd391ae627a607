"""A run answering a user message names it: its agent_started carries the
message's id, so Herald keeps the question (the `user_message` event it
publishes for every accepted message) with the run, and a page opened
mid-run is replayed the question, then the run."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from websockets.sync.client import connect

from herald_gateway import (
    AsyncHerald,
    ChatRequest,
    Herald,
    UserMessage,
    mint_token,
    verify_webhook,
)

from conftest import API_KEY, SECRET, Hooked, events

HOOK_SECRET = "py-turns-hook-secret-0123456789"


@pytest.mark.parametrize("client", ["sync", "async"])
def test_the_agent_started_of_a_run_of_a_user_message_names_the_message(herald_server, client):
    ws = herald_server.ws("ann")
    message = UserMessage("ann", "t1", "msg-42", "what is the weather?")

    if client == "sync":
        with Herald(herald_server.url, API_KEY) as h:
            with h.run(message) as answer:
                pass
            with h.run("ann", thread_id="t1") as plain:
                pass
    else:

        async def main() -> tuple:
            async with AsyncHerald(herald_server.url, API_KEY) as h:
                async with h.run(message) as answer:
                    pass
                async with h.run("ann", thread_id="t1") as plain:
                    pass
            return answer, plain

        answer, plain = asyncio.run(main())

    got = events(ws, 4)
    assert [(e["event"], e["run_id"]) for e in got] == [
        ("agent_started", answer.run_id),
        ("agent_completed", answer.run_id),
        ("agent_started", plain.run_id),
        ("agent_completed", plain.run_id),
    ]
    assert answer.message_id == "msg-42" and plain.message_id is None
    # The run of the message names it; a run of a user id names nothing.
    assert got[0]["data"] == {"message_id": "msg-42"}
    assert got[0]["thread_id"] == "t1"
    assert got[2]["data"] == {}


def _replaying_socket(addr: str, user: str):
    """A new socket of `user` whose hello asks for the open runs (no resume):
    the welcome, then every frame up to `caught_up`."""
    ws = connect(f"ws://{addr}/ws", subprotocols=["herald.v1"])  # type: ignore[list-item]
    ws.send(json.dumps({"type": "hello", "token": mint_token(SECRET, user), "replay_active_runs": True}))
    welcome = json.loads(ws.recv(timeout=10))
    assert welcome["type"] == "welcome" and welcome["replaying"] is True, welcome
    frames = []
    while True:
        frame = json.loads(ws.recv(timeout=10))
        if frame["type"] == "caught_up":
            return ws, welcome, frames, frame
        frames.append(frame)


def test_a_page_opened_mid_run_is_replayed_the_question_then_the_run():
    hooked = Hooked(HOOK_SECRET)
    server = hooked.server
    try:
        sender = server.ws("kai")
        sender.send(json.dumps({
            "type": "user_message", "id": "q-1", "thread_id": "t9",
            "text": "what time is it?", "data": {"lang": "en"},
        }))
        headers, body = hooked.received.get(timeout=10)
        message = verify_webhook(HOOK_SECRET, headers, body)
        assert isinstance(message, UserMessage) and message.message_id == "q-1"

        with Herald(server.url, API_KEY) as h:
            # The backend answers with the SDK's run of the message, and the
            # run is still open when a new page connects.
            with h.run(message) as run:
                run.thinking("looking at the clock")
                live = events(sender, 3)
                assert [e["event"] for e in live] == ["user_message", "agent_started", "agent_thinking"]

                page, welcome, frames, caught_up = _replaying_socket(server.addr, "kai")
                replayed = [f for f in frames if f["type"] == "event"]
                # The question first, then the run: each once, in seq order.
                assert [e["event"] for e in replayed] == [
                    "user_message", "agent_started", "agent_thinking",
                ], frames
                question, started, thinking = replayed
                assert question["data"] == {
                    "id": "q-1", "text": "what time is it?", "data": {"lang": "en"}, "user_id": "kai",
                }
                assert question["thread_id"] == "t9" and "run_id" not in question
                assert started["run_id"] == thinking["run_id"] == run.run_id
                assert started["data"] == {"message_id": "q-1"}
                seqs = [e["seq"] for e in replayed]
                assert seqs == sorted(set(seqs)), seqs
                assert [e["seq"] for e in live] == seqs, "the events the sender saw live"
                assert all(e.get("replayed") is True for e in replayed)
                assert caught_up["seq"] == seqs[-1]
                # Nothing is sent a second time after the replay.
                with pytest.raises(TimeoutError):
                    page.recv(timeout=0.5)
                run.complete("noon")
        # The run's end reaches the page live, once.
        ended = events(page, 1)[0]
        assert (ended["event"], ended["run_id"]) == ("agent_completed", run.run_id)
        assert "replayed" not in ended
        page.close()
        sender.close()
    finally:
        hooked.stop()


def test_only_a_run_of_a_user_message_names_a_message():
    """What each kind of run publishes as its opening (a mock of Herald's
    publish endpoint): a ChatRequest's run and a user id's are unchanged."""
    published: list = []

    def endpoint(request: httpx.Request) -> httpx.Response:
        published.append(json.loads(request.content))
        return httpx.Response(200, json={"results": [{"seq": len(published), "epoch": "e", "delivered": 0}]})

    request = ChatRequest("u1", "chat1", "run_c", "regenerate-message", "m-old", [])
    message = UserMessage("u2", "t2", "m-new", "hi")
    with Herald("http://herald.test", "k", transport=httpx.MockTransport(endpoint)) as h:
        with h.run(message, run_id="run_m"):
            pass
        with h.run(message, run_id="run_s", started=True):  # opened elsewhere: nothing to name
            pass
        with h.run(request):
            pass
        with h.run(request, started=False):
            pass
        with h.run("u3", run_id="run_u"):
            pass
    assert [(e["event"], e["run_id"], e.get("data")) for e in published] == [
        ("agent_started", "run_m", {"message_id": "m-new"}),
        ("agent_completed", "run_m", {}),
        ("agent_completed", "run_s", {}),
        ("agent_completed", "run_c", {}),
        ("agent_started", "run_c", {}),
        ("agent_completed", "run_c", {}),
        ("agent_started", "run_u", {}),
        ("agent_completed", "run_u", {}),
    ]
    assert h.run(request).message_id is None and h.run(message).message_id == "m-new"
