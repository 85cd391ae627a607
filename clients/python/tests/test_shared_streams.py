"""Shared streams (`thread:t1`, …) from the SDK against a real Herald:
publishing to one, a run of a message written to one (its events and its
text in that stream), a run in one, a member's cancel, removing a member,
who is in one (presence), the `streams` grant of a minted token, and
targets that are refused."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from typing import Any, Dict, List, Optional

import pytest
from websockets.sync.client import ClientConnection

from herald_gateway import (
    AsyncHerald,
    Cancel,
    Herald,
    HeraldError,
    InvalidSignature,
    Presence,
    PresenceUser,
    SubscribeRequest,
    UserMessage,
    mint_token,
    verify_webhook,
)

from conftest import API_KEY, SECRET, Hooked, events, frame, join_deltas, member

HOOK_SECRET = "py-streams-hook-secret-0123456789"


def run_events(ws: ClientConnection) -> List[Dict[str, Any]]:
    """The event frames up to the first run's end (`agent_completed`), each
    series of a part's text deltas joined into one frame (`join_deltas`, which
    checks that they cover every seq once, in order)."""
    out: List[Dict[str, Any]] = []
    while not out or out[-1]["event"] != "agent_completed":
        out.extend(events(ws, 1))
    return join_deltas(out)


def nothing_more(ws: ClientConnection) -> None:
    with pytest.raises(TimeoutError):
        ws.recv(timeout=0.5)


@pytest.mark.parametrize("client", ["sync", "async"])
def test_publish_to_a_shared_stream_reaches_every_member(herald_server, client):
    ana = member(herald_server, "ana", {"thread:t1": "rw"}, "thread:t1")
    bob = member(herald_server, "bob", {"thread:*": "r"}, "thread:t1")
    batch = [
        {"stream": "thread:t1", "event": "a", "data": {"n": 2}},
        {"user_id": "ana", "event": "own"},
    ]

    if client == "sync":
        with Herald(herald_server.url, API_KEY) as h:
            one = h.publish(event="note", stream="thread:t1", data={"n": 1}, thread_id="t1", idempotency_key="k1")
            again = h.publish(None, "note", stream="thread:t1", data={"n": 1}, idempotency_key="k1")
            many = h.publish_many(batch)
            own = h.publish("ana", "plain")  # the old call, unchanged
    else:

        async def main() -> tuple:
            async with AsyncHerald(herald_server.url, API_KEY) as h:
                return (
                    await h.publish(event="note", stream="thread:t1", data={"n": 1}, thread_id="t1", idempotency_key="k1"),
                    await h.publish(None, "note", stream="thread:t1", data={"n": 1}, idempotency_key="k1"),
                    await h.publish_many(batch),
                    await h.publish("ana", "plain"),
                )

        one, again, many, own = asyncio.run(main())

    # The stream has its own seq; the key stored the event once.
    assert (one.seq, one.duplicate) == (1, False)
    assert (again.seq, again.duplicate) == (1, True)
    assert [m.seq for m in many] == [2, 1] and own.seq == 2
    got = events(ana, 4)
    shared = [(e["seq"], e["event"], e["data"]) for e in got if e.get("stream") == "thread:t1"]
    mine = [(e["seq"], e["event"]) for e in got if "stream" not in e]
    assert shared == [(1, "note", {"n": 1}), (2, "a", {"n": 2})]
    assert mine == [(1, "own"), (2, "plain")]
    # Another member reads the stream, not ana's own events.
    assert [(e["stream"], e["seq"], e["event"]) for e in events(bob, 2)] == [
        ("thread:t1", 1, "note"),
        ("thread:t1", 2, "a"),
    ]
    nothing_more(bob)


def test_bad_targets_raise(herald_server):
    message = UserMessage("ana", "t1", "m1", "hi", stream="thread:t1")
    with Herald(herald_server.url, API_KEY) as h:
        # Both, neither, or no event: refused before anything is sent.
        with pytest.raises(TypeError, match="exactly one"):
            h.publish("ana", "x", stream="thread:t1")
        with pytest.raises(TypeError, match="exactly one"):
            h.publish(event="x")
        with pytest.raises(TypeError, match="event"):
            h.publish(stream="thread:t1")  # type: ignore[call-overload]
        with pytest.raises(TypeError, match=r"events\[1\]"):
            h.publish_many([{"stream": "thread:t1", "event": "a"}, {"event": "b"}])
        with pytest.raises(TypeError, match=r"events\[0\]"):
            h.publish_many([{"user_id": "ana", "stream": "thread:t1", "event": "a"}])
        with pytest.raises(TypeError):
            h.run("ana", stream="thread:t1")
        with pytest.raises(TypeError):
            h.run()
        with pytest.raises(TypeError):
            h.run(message, stream="thread:t2")
        # A name Herald refuses: 400 naming the field.
        for bad in ("user:ana", "no namespace", ""):
            with pytest.raises(HeraldError) as refused:
                h.publish(event="x", stream=bad)
            assert (refused.value.status, refused.value.field) == (400, "stream"), bad
        with pytest.raises(HeraldError) as refused:
            h.publish_many([{"user_id": "ana", "event": "a"}, {"stream": "user:ana", "event": "b"}])
        assert refused.value.field == "events[1].stream"
        with pytest.raises(HeraldError) as refused:
            h.unsubscribe("user:bob", "bob")
        assert (refused.value.status, refused.value.field) == (400, "stream")
    with pytest.raises(ValueError):
        mint_token(SECRET, "ana", streams={"thread:t1": "w"})


@pytest.mark.parametrize("client", ["sync", "async"])
def test_a_run_of_a_message_written_to_a_stream_answers_in_the_stream(client):
    hooked = Hooked(HOOK_SECRET)
    server = hooked.server
    try:
        ana = member(server, "ana", {"thread:t1": "rw"}, "thread:t1")
        bob = member(server, "bob", {"thread:t1": "r"}, "thread:t1")
        ana.send(json.dumps({
            "type": "user_message", "id": "q-1", "thread_id": "t1",
            "text": "who is on call?", "stream": "thread:t1",
        }))
        headers, body = hooked.received.get(timeout=10)
        message = verify_webhook(HOOK_SECRET, headers, body)
        assert isinstance(message, UserMessage)
        assert (message.user_id, message.stream, message.message_id) == ("ana", "thread:t1", "q-1")

        if client == "sync":
            with Herald(server.url, API_KEY) as h:
                with h.run(message) as run:
                    run.thinking("checking the rota")
                    with run.tool("rota", {"day": "today"}) as call:
                        call.result = "bob"
                    run.text("Bo")
                    run.text("b.")
                    run.complete("Bob.")
        else:

            async def main() -> Any:
                async with AsyncHerald(server.url, API_KEY) as h:
                    async with h.run(message) as run:
                        await run.thinking("checking the rota")
                        async with run.tool("rota", {"day": "today"}) as call:
                            call.result = "bob"
                        run.text("Bo")
                        run.text("b.")
                        run.complete("Bob.")
                return run

            run = asyncio.run(main())

        assert (run.stream, run.user_id, run.message_id) == ("thread:t1", "ana", "q-1")
        for ws in (ana, bob):
            got = run_events(ws)
            # Everything is in the stream (ana's socket reads her own stream
            # too: nothing of the run went there).
            assert all(e.get("stream") == "thread:t1" for e in got), got
            assert [e["event"] for e in got] == [
                "user_message", "agent_started", "agent_thinking", "tool_executing",
                "tool_completed", "agent_text_delta", "agent_completed",
            ]
            question, started = got[0], got[1]
            assert question["data"]["user_id"] == "ana"
            assert started["data"] == {"message_id": "q-1"} and started["thread_id"] == "t1"
            assert {e["run_id"] for e in got[1:]} == {run.run_id}
            text = got[5]
            assert (text.get("from_seq"), text["seq"], text["data"]) == (
                got[4]["seq"] + 1, got[4]["seq"] + 2, {"part": "answer", "text": "Bob."},
            )
            nothing_more(ws)
        ana.close()
        bob.close()
    finally:
        hooked.stop()


def test_a_members_cancel_of_a_stream_run_names_the_stream():
    hooked = Hooked(HOOK_SECRET)
    server = hooked.server
    try:
        ana = member(server, "ana", {"thread:t1": "rw"}, "thread:t1")
        bob = member(server, "bob", {"thread:t1": "rw"}, "thread:t1")
        ana.send(json.dumps({
            "type": "user_message", "id": "q-2", "thread_id": "t1", "text": "a long one", "stream": "thread:t1",
        }))
        message = verify_webhook(HOOK_SECRET, *hooked.received.get(timeout=10))
        assert isinstance(message, UserMessage) and message.stream == "thread:t1"
        with Herald(server.url, API_KEY) as h:
            with h.run(message) as run:
                # Bob, another member who may write, stops ana's question's run.
                bob.send(json.dumps({"type": "cancel", "run_id": run.run_id, "stream": "thread:t1"}))
                cancel = verify_webhook(HOOK_SECRET, *hooked.received.get(timeout=10))
        assert isinstance(cancel, Cancel)
        assert (cancel.user_id, cancel.run_id, cancel.stream) == ("bob", run.run_id, "thread:t1")
        ana.close()
        bob.close()
    finally:
        hooked.stop()


def test_a_subscribe_request_is_answered_by_the_backend_with_the_sdk():
    asked: "List[SubscribeRequest]" = []

    def answer(headers: Dict[str, str], body: bytes) -> Dict[str, bool]:
        request = verify_webhook(HOOK_SECRET, headers, body)
        assert isinstance(request, SubscribeRequest), request
        asked.append(request)
        return request.allow(write=True) if request.stream.startswith("room:") else request.deny()

    hooked = Hooked(HOOK_SECRET, answer, {"HERALD_SUBSCRIBE_PROXY": "true"})
    try:
        ws = hooked.server.ws("cy")  # a token without a `streams` claim
        ws.send(json.dumps({"type": "subscribe", "stream": "room:ops"}))
        subscribed = frame(ws, "subscribed")
        assert (subscribed["stream"], subscribed["write"]) == ("room:ops", True)
        ws.send(json.dumps({"type": "subscribe", "stream": "thread:secret"}))
        refused = json.loads(ws.recv(timeout=10))
        while refused["type"] != "error":  # the first stream's frames
            assert refused.get("stream") == "room:ops", refused
            refused = json.loads(ws.recv(timeout=10))
        assert (refused["type"], refused["code"], refused["stream"]) == ("error", "forbidden", "thread:secret")
        assert [(r.user_id, r.stream) for r in asked] == [("cy", "room:ops"), ("cy", "thread:secret")]
        assert all(r.conn_id and r.received_at and r.delivery_id for r in asked)
        ws.close()
    finally:
        hooked.stop()


@pytest.mark.parametrize("client", ["sync", "async"])
def test_a_run_in_a_stream_that_answers_no_message(herald_server, client):
    cy = member(herald_server, "cy", {"room:*": "r"}, "room:ops")

    if client == "sync":
        with Herald(herald_server.url, API_KEY) as h:
            with h.run(stream="room:ops", thread_id="daily") as run:
                run.text("all ")
                run.text("green")
    else:

        async def main() -> Any:
            async with AsyncHerald(herald_server.url, API_KEY) as h:
                async with h.run(stream="room:ops", thread_id="daily") as run:
                    run.text("all ")
                    run.text("green")
            return run

        run = asyncio.run(main())

    assert (run.stream, run.user_id, run.message_id) == ("room:ops", None, None)
    got = run_events(cy)
    assert [(e["stream"], e["event"], e["run_id"], e["thread_id"]) for e in got] == [
        ("room:ops", event, run.run_id, "daily")
        for event in ("agent_started", "agent_text_delta", "agent_completed")
    ]
    assert [(e.get("from_seq", e["seq"]), e["seq"]) for e in got] == [(1, 1), (2, 3), (4, 4)]
    assert got[0]["data"] == {}
    assert got[1]["data"] == {"part": "answer", "text": "all green"}
    nothing_more(cy)


@pytest.mark.parametrize("client", ["sync", "async"])
def test_unsubscribe_removes_a_member_on_every_socket(herald_server, client):
    ana = member(herald_server, "ana", {"thread:t1": "rw"}, "thread:t1")
    bob = member(herald_server, "bob", {"thread:t1": "r"}, "thread:t1")
    bob2 = member(herald_server, "bob", {"thread:t1": "r"}, "thread:t1")

    if client == "sync":
        with Herald(herald_server.url, API_KEY) as h:
            removed = h.unsubscribe("thread:t1", "bob")
            again = h.unsubscribe("thread:t1", "bob")
            h.publish(event="after", stream="thread:t1")
    else:

        async def main() -> tuple:
            async with AsyncHerald(herald_server.url, API_KEY) as h:
                removed = await h.unsubscribe("thread:t1", "bob")
                again = await h.unsubscribe("thread:t1", "bob")
                await h.publish(event="after", stream="thread:t1")
            return removed, again

        removed, again = asyncio.run(main())

    assert (removed, again) == (2, 0)
    for ws in (bob, bob2):
        told = frame(ws, "unsubscribed")
        assert (told["stream"], told["reason"]) == ("thread:t1", "removed")
        nothing_more(ws)
    # The member who stays still reads the stream.
    assert [(e["stream"], e["event"]) for e in events(ana, 1)] == [("thread:t1", "after")]


@pytest.mark.parametrize("client", ["sync", "async"])
def test_presence_lists_the_members_of_a_stream(herald_server, client):
    room = f"room:presence-{client}"
    ana = member(herald_server, "ana", {"room:*": "rw"}, room)
    ana2 = member(herald_server, "ana", {"room:*": "rw"}, room)
    bob = member(herald_server, "bob", {room: "r"}, room)

    def ask(limit: Optional[int] = None, stream: str = room) -> Presence:
        if client == "sync":
            with Herald(herald_server.url, API_KEY) as h:
                return h.presence(stream) if limit is None else h.presence(stream, limit=limit)

        async def main() -> Presence:
            async with AsyncHerald(herald_server.url, API_KEY) as h:
                return await (h.presence(stream) if limit is None else h.presence(stream, limit))

        return asyncio.run(main())

    def settled(connections: int) -> Presence:
        """Presence is recorded a moment after each subscribe and close."""
        deadline = time.time() + 5
        while True:
            p = ask()
            if p.total_connections == connections or time.time() > deadline:
                return p
            time.sleep(0.05)

    p = settled(3)
    assert p == Presence(
        stream=room,
        users=[PresenceUser("ana", 2), PresenceUser("bob", 1)],
        total_users=2,
        total_connections=3,
    )
    # At most `limit` listed; the totals count everyone.
    one = ask(limit=1)
    assert (one.users, one.total_users, one.total_connections) == ([PresenceUser("ana", 2)], 2, 3)
    assert ask(stream="room:nobody") == Presence("room:nobody", [], 0, 0)
    with pytest.raises(HeraldError) as refused:
        ask(stream="user:ana")
    assert (refused.value.status, refused.value.field) == (400, "stream")
    # Bob's only socket and one of ana's go.
    bob.close()
    ana2.close()
    p = settled(1)
    assert (p.users, p.total_users, p.total_connections) == ([PresenceUser("ana", 1)], 1, 1)
    ana.close()


def _signed(payload: Dict[str, Any]) -> tuple:
    body = json.dumps(payload).encode()
    ts = str(int(time.time()))
    mac = hmac.new(HOOK_SECRET.encode(), f"{ts}.d1.".encode() + body, hashlib.sha256).hexdigest()
    return {"X-Herald-Timestamp": ts, "X-Herald-Delivery": "d1", "X-Herald-Signature": "v2=" + mac}, body


def test_the_stream_of_a_webhook_event_is_parsed_and_checked():
    message = {"type": "user_message", "user_id": "u1", "thread_id": "t1", "message_id": "m1", "text": "hi"}
    cancel = {"type": "cancel", "user_id": "u1", "run_id": "r1"}
    # Absent: the user's own stream.
    assert verify_webhook(HOOK_SECRET, *_signed(message)).stream is None  # type: ignore[union-attr]
    assert verify_webhook(HOOK_SECRET, *_signed(cancel)).stream is None  # type: ignore[union-attr]
    assert verify_webhook(HOOK_SECRET, *_signed({**message, "stream": "thread:t1"})).stream == "thread:t1"  # type: ignore[union-attr]
    assert verify_webhook(HOOK_SECRET, *_signed({**cancel, "stream": "thread:t1"})).stream == "thread:t1"  # type: ignore[union-attr]
    for payload in ({**message, "stream": 5}, {**cancel, "stream": ["thread:t1"]}):
        with pytest.raises(InvalidSignature):
            verify_webhook(HOOK_SECRET, *_signed(payload))
