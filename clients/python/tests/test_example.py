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

from conftest import API_KEY, HeraldProcess, free_port

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
    assert got[0] == {"type": "ack", "id": "m1", "status": "accepted"}
    assert [f["event"] for f in got[1:]] == [
        "agent_started", "agent_thinking", "tool_executing", "tool_completed",
        "agent_thinking", "agent_completed",
    ]
    assert got[-1]["data"] == {"final_response": "You said: hello"}

    ws.send(json.dumps({"type": "user_message", "id": "m2", "thread_id": "t1", "text": "stop me"}))
    started = frames_until(ws, lambda f: f.get("event") == "agent_started")
    ws.send(json.dumps({"type": "cancel", "run_id": started[-1]["run_id"]}))
    rest = frames_until(ws, lambda f: f.get("event") in ("agent_cancelled", "agent_completed"))
    assert rest[-1]["event"] == "agent_cancelled", rest


def _delivery(user: str, message_id: str, text: str, delivery_id: str) -> tuple:
    """A signed webhook request as Herald sends it: (headers, body)."""
    body = json.dumps(
        {"type": "user_message", "user_id": user, "thread_id": "t1", "message_id": message_id,
         "text": text, "data": {}, "conn_id": "c1", "received_at": "2026-01-01T00:00:00Z"}
    ).encode()
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
        runs = {f["run_id"] for f in got if f.get("type") == "event"}
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
