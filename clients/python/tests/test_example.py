"""The FastAPI example end to end: Herald → webhook → fake agent → Herald → browser."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from conftest import API_KEY, HeraldProcess, free_port

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
HOOK_SECRET = "py-example-secret-0123456789"


def frames_until(ws, done) -> list:
    out = []
    while True:
        frame = json.loads(ws.recv(timeout=15))
        out.append(frame)
        if done(frame):
            return out


def test_fastapi_example_streams_a_run_and_honours_cancel():
    port = free_port()
    server = None
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
    finally:
        if server is not None:
            server.stop()
        if "app" in locals():
            app.terminate()
            app.wait(timeout=10)
