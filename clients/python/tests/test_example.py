"""The FastAPI example end to end: Herald → webhook → fake agent → Herald → browser."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from conftest import API_KEY, HeraldProcess, ai_response, frame, free_port, member

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
HOOK_SECRET = "py-example-secret-0123456789"


def frames_until(ws, done, timeout: float = 15) -> list:
    out = []
    while True:
        frame = json.loads(ws.recv(timeout=timeout))
        out.append(frame)
        if done(frame):
            return out


def _ended(frame) -> bool:
    return frame.get("event") in ("agent_completed", "agent_error", "agent_cancelled")


@pytest.fixture(scope="module")
def example() -> Iterator[tuple]:
    """Herald, and the example app as its webhook: (Herald, the app's URL)."""
    port = free_port()
    server = None
    app = None
    env = dict(os.environ)
    env.update(
        {
            "HERALD_API_KEY": API_KEY,
            "HERALD_WEBHOOK_SECRET": HOOK_SECRET,
            "AGENT_STEP_SECONDS": "0.3",
        }
    )
    try:
        server = HeraldProcess(
            {
                "HERALD_WEBHOOK_URL": f"http://127.0.0.1:{port}/herald/webhook",
                "HERALD_WEBHOOK_SECRET": HOOK_SECRET,
                "HERALD_SUBSCRIBE_PROXY": "true",
            }
        )
        env["HERALD_URL"] = server.url
        app = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "fastapi_agent:app", "--port", str(port),
             "--log-level", "warning"],
            cwd=EXAMPLES, env=env,
        )
        deadline = time.time() + 20
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/docs", timeout=1)
                break
            except httpx.TransportError:
                assert time.time() < deadline, "the example did not start"
                time.sleep(0.1)
        yield server, f"http://127.0.0.1:{port}/herald/webhook"
    finally:
        if server is not None:
            server.stop()
        if app is not None:
            app.terminate()
            app.wait(timeout=10)


def test_fastapi_example_streams_a_run_and_honours_cancel(example):
    server, _ = example
    ws = server.ws("hal")
    ws.send(json.dumps({"type": "user_message", "id": "m1", "thread_id": "t1", "text": "hello"}))
    got = frames_until(ws, lambda f: f.get("event") in ("agent_completed", "agent_error"))
    # Herald publishes the accepted message before it forwards it: the
    # question comes first, then the ack, then the run.
    assert (got[0]["type"], got[0]["event"], got[0]["thread_id"]) == ("event", "user_message", "t1")
    assert got[0]["data"] == {"id": "m1", "text": "hello", "data": {}, "user_id": "hal"}
    assert got[1] == {"type": "ack", "id": "m1", "status": "accepted"}
    assert [f["event"] for f in got[2:]] == [
        "agent_started", "agent_thinking", "tool_executing", "tool_completed",
        "agent_thinking", "agent_completed",
    ]
    assert got[2]["data"]["message_id"] == "m1", "the run names the message it answers"
    assert got[-1]["data"] == {"final_response": "You said: hello"}

    ws.send(json.dumps({"type": "user_message", "id": "m2", "thread_id": "t1", "text": "stop me"}))
    started = frames_until(ws, lambda f: f.get("event") == "agent_started")
    ws.send(json.dumps({"type": "cancel", "run_id": started[-1]["run_id"]}))
    rest = frames_until(ws, lambda f: f.get("event") in ("agent_cancelled", "agent_completed"))
    assert rest[-1]["event"] == "agent_cancelled", rest


def test_fastapi_example_answers_in_a_shared_stream_and_any_writer_may_stop_it(example):
    server, _ = example
    ana = member(server, "ana", {"thread:ex": "rw"}, "thread:ex")
    bob = member(server, "bob", {"thread:ex": "rw"}, "thread:ex")
    ana.send(json.dumps({
        "type": "user_message", "id": "s1", "thread_id": "t1", "text": "stop me", "stream": "thread:ex",
    }))
    started = frames_until(bob, lambda f: f.get("event") == "agent_started")
    assert (started[-1]["stream"], started[-1]["data"]["message_id"]) == ("thread:ex", "s1")
    # Bob stops the run answering ana's question: the example finds it by
    # the stream, not by the user who asked.
    bob.send(json.dumps({"type": "cancel", "run_id": started[-1]["run_id"], "stream": "thread:ex"}))
    rest = frames_until(ana, _ended)
    assert rest[-1]["event"] == "agent_cancelled", rest
    assert all(f.get("stream") == "thread:ex" for f in rest if f["type"] == "event"), rest
    ana.close()
    bob.close()


def test_fastapi_example_opens_rooms_to_a_token_without_streams_and_refuses_the_rest(example):
    server, hook = example
    ws = server.ws("dee")  # its token grants no shared stream
    ws.send(json.dumps({"type": "subscribe", "stream": "room:lobby"}))
    subscribed = frame(ws, "subscribed")
    assert (subscribed["stream"], subscribed["write"]) == ("room:lobby", True)
    ws.send(json.dumps({"type": "subscribe", "stream": "thread:private"}))
    refused = frames_until(ws, lambda f: f["type"] == "error")[-1]
    assert (refused["code"], refused["stream"]) == ("forbidden", "thread:private")
    # A retried delivery is answered again, not taken as acted on.
    payload = {"type": "subscribe_request", "user_id": "dee", "stream": "room:lobby",
               "conn_id": "c1", "received_at": "2026-01-01T00:00:00Z"}
    for _ in range(2):
        headers, body = _signed(payload, "sub-delivery-1")
        assert httpx.post(hook, content=body, headers=headers).json() == {"allow": True, "write": True}
    ws.close()


def _delivery(user: str, message_id: str, text: str, delivery_id: str) -> tuple:
    """A signed webhook request as Herald sends it: (headers, body)."""
    return _signed(
        {"type": "user_message", "user_id": user, "thread_id": "t1", "message_id": message_id,
         "text": text, "data": {}, "conn_id": "c1", "received_at": "2026-01-01T00:00:00Z"},
        delivery_id,
    )


def _signed(payload: dict, delivery_id: str) -> tuple:
    """`payload` signed as Herald signs its webhook requests: (headers, body)."""
    body = json.dumps(payload).encode()
    ts = str(int(time.time()))
    mac = hmac.new(HOOK_SECRET.encode(), f"{ts}.{delivery_id}.".encode() + body, hashlib.sha256)
    headers = {
        "Content-Type": "application/json",
        "X-Herald-Timestamp": ts,
        "X-Herald-Delivery": delivery_id,
        "X-Herald-Signature": "v2=" + mac.hexdigest(),
    }
    return headers, body


def test_fastapi_example_acts_once_on_a_replayed_delivery(example):
    server, hook = example
    ws = server.ws("rex")
    headers, body = _delivery("rex", "m1", "once", "delivery-1")
    assert httpx.post(hook, headers=headers, content=body).status_code == 200
    first = frames_until(ws, _ended)
    assert first[-1]["data"] == {"final_response": "You said: once"}
    # The same delivery again (Herald's retry of a lost answer, or a replay
    # within the signature's window): answered, and not acted on.
    assert httpx.post(hook, headers=headers, content=body).status_code == 200
    # A new delivery: its run is the only one that follows.
    headers, body = _delivery("rex", "m2", "next", "delivery-2")
    assert httpx.post(hook, headers=headers, content=body).status_code == 200
    rest = frames_until(ws, lambda f: _ended(f) and f["data"] == {"final_response": "You said: next"})
    started = [f for f in rest if f.get("event") == "agent_started"]
    assert len(started) == 1, [(f.get("event"), f.get("data")) for f in rest]
    assert {f["run_id"] for f in rest} == {started[0]["run_id"]}


def test_fastapi_example_answers_two_users_who_use_the_same_message_id(example):
    server, _ = example
    sockets = {user: server.ws(user) for user in ("ivy", "jon")}
    for user, ws in sockets.items():
        ws.send(json.dumps({"type": "user_message", "id": "same", "thread_id": "t1", "text": f"from {user}"}))
    for user, ws in sockets.items():
        got = frames_until(ws, _ended, timeout=10)
        # The ack (sent once the webhook answered) and the run race.
        if {"type": "ack", "id": "same", "status": "accepted"} not in got:
            got += frames_until(ws, lambda f: f.get("type") == "ack", timeout=10)
        assert {"type": "ack", "id": "same", "status": "accepted"} in got
        # Each user's own question (published before the run), then one run.
        questions = [f for f in got if f.get("event") == "user_message"]
        assert [(q["data"]["id"], q["data"]["user_id"], q["data"]["text"]) for q in questions] == [
            ("same", user, f"from {user}"),
        ]
        runs = {f["run_id"] for f in got if f.get("type") == "event" and f["event"] != "user_message"}
        assert len(runs) == 1
        completed = [f for f in got if f.get("event") == "agent_completed"]
        assert [f["data"] for f in completed] == [{"final_response": f"You said: from {user}"}]


def test_fastapi_example_answers_401_to_malformed_headers(example):
    # Starlette decodes header bytes as latin-1: b"\xb2" arrives as "²"
    # (str.isdigit() is true, int() refuses it), b"v2=\xe9" as "v2=é".
    _, hook = example
    headers, body = _delivery("kim", "m1", "x", "delivery-k")
    for name, value in [
        ("X-Herald-Timestamp", b"\xb2"),
        ("X-Herald-Signature", b"v2=\xe9"),
        ("X-Herald-Signature", b"v2=" + b"\xe9" * 64),
        ("X-Herald-Timestamp", b"9" * 5000),
        ("X-Herald-Delivery", b""),
    ]:
        bad = {**headers, name: value}
        assert httpx.post(hook, headers=bad, content=body).status_code == 401, (name, value)


def _send(request_id: str, chat: str, text: str) -> str:
    """useChat's `send` frame on /ai (WebSocketChatTransport)."""
    return json.dumps(
        {"type": "send", "requestId": request_id, "id": chat, "trigger": "submit-message",
         "messages": [{"id": "m1", "role": "user", "parts": [{"type": "text", "text": text}]}],
         "headers": {}, "body": {}}
    )


def test_fastapi_example_answers_usechat_in_heralds_run(example):
    server, _ = example
    watcher = server.ws("uma")
    ai = server.ai("uma")
    ai.send(_send("r1", "chat-1", "hello there"))
    chunks, last = ai_response(ai, "r1")
    assert last["type"] == "end", last
    kinds = [c["type"] for c in chunks]
    assert kinds[0] == "start" and kinds.count("start") == 1 and kinds[-1] == "finish", kinds
    run_id = chunks[0]["messageId"]
    assert "reasoning-delta" in kinds
    assert [c["toolName"] for c in chunks if c["type"] == "tool-input-available"] == ["search"]
    text = "".join(c["delta"] for c in chunks if c["type"] == "text-delta")
    assert text == "You said: hello there"
    # The run is Herald's, in the chat's thread, and opened once.
    got = frames_until(watcher, lambda f: f.get("event") == "agent_completed")
    got = [f for f in got if f.get("type") == "event"]
    assert [f["event"] for f in got].count("agent_started") == 1
    assert got[0]["event"] == "agent_started" and got[0]["data"]["source"] == "ai_sdk"
    assert {f["run_id"] for f in got} == {run_id}
    assert {f["thread_id"] for f in got} == {"chat-1"}
    assert got[-1]["data"] == {"final_response": "You said: hello there"}
    ai.close()
    watcher.close()


def test_fastapi_example_stops_a_usechat_answer(example):
    server, _ = example
    watcher = server.ws("vic")
    ai = server.ai("vic")
    ai.send(_send("r1", "chat-s", "stop me"))
    # The agent is working (its first thought is out): the user presses Stop.
    frames_until(watcher, lambda f: f.get("event") == "agent_thinking")
    ai.send(json.dumps({"type": "abort", "requestId": "r1"}))
    rest = frames_until(watcher, _ended)
    assert rest[-1]["event"] == "agent_cancelled", rest
    ai.close()
    watcher.close()


def test_fastapi_example_acts_once_on_a_replayed_chat_request(example):
    server, hook = example
    ws = server.ws("wes")

    def turn(run_id: str, text: str) -> dict:
        return {"type": "chat_request", "user_id": "wes", "chat_id": "chat-r", "run_id": run_id,
                "trigger": "submit-message", "message_id": None,
                "messages": [{"id": "m1", "role": "user", "parts": [{"type": "text", "text": text}]}],
                "body": {}, "metadata": None, "conn_id": "c1", "received_at": "2026-01-01T00:00:00Z"}

    headers, body = _signed(turn("run_" + "a" * 24, "once"), "chat-delivery-1")
    assert httpx.post(hook, headers=headers, content=body).status_code == 200
    assert httpx.post(hook, headers=headers, content=body).status_code == 200  # a retry or a replay
    headers, body = _signed(turn("run_" + "b" * 24, "next"), "chat-delivery-2")
    assert httpx.post(hook, headers=headers, content=body).status_code == 200
    got = frames_until(ws, lambda f: _ended(f) and f["run_id"] == "run_" + "b" * 24)
    got = [f for f in got if f.get("type") == "event"]
    ended = [(f["run_id"], f["event"], f["data"]) for f in got if _ended(f)]
    assert ended == [
        ("run_" + "a" * 24, "agent_completed", {"final_response": "You said: once"}),
        ("run_" + "b" * 24, "agent_completed", {"final_response": "You said: next"}),
    ]
    # Herald opened neither run here, and the example does not open them.
    assert "agent_started" not in [f["event"] for f in got]
    thoughts = [f["data"]["text"] for f in got if f["event"] == "agent_thinking"]
    assert thoughts.count("Reading: once") == 1
