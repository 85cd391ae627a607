"""Fixtures: a real `herald serve` (the binary built by cargo) on a free port."""

from __future__ import annotations

import json
import os
import socket
import http.server
import queue
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional

import pytest
from websockets.sync.client import ClientConnection, connect

from herald_gateway import mint_token

ROOT = Path(__file__).resolve().parents[3]
BIN = os.environ.get("HERALD_BIN", str(ROOT / "target" / "debug" / "herald"))
SECRET = "py-test-secret-0123456789abcdef0123"
API_KEY = "py-test-api-key-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class HeraldProcess:
    """A running `herald serve`; `url` is its HTTP base URL."""

    def __init__(self, env: Dict[str, str]) -> None:
        full = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
        full.update(
            {
                "HERALD_ADDR": "127.0.0.1:0",
                "HERALD_JWT_HS256_SECRET": SECRET,
                "HERALD_API_KEY": API_KEY,
            }
        )
        full.update(env)
        self.proc = subprocess.Popen(
            [BIN, "serve"], env=full, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
        )
        self.addr: Optional[str] = None
        deadline = time.time() + 20
        assert self.proc.stderr is not None
        while time.time() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            if line.startswith("herald listening on "):
                self.addr = line.split()[-1]
                break
        assert self.addr, "herald did not start"
        # Keep draining stderr so the server never blocks on a full pipe.
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()
        self.url = f"http://{self.addr}"

    def ws(self, user: str) -> ClientConnection:
        """A WebSocket that completed hello as `user` (the welcome is consumed)."""
        ws = connect(f"ws://{self.addr}/ws", subprotocols=["herald.v1"])  # type: ignore[list-item]
        ws.send(json.dumps({"type": "hello", "token": mint_token(SECRET, user)}))
        welcome = json.loads(ws.recv(timeout=10))
        assert welcome["type"] == "welcome", welcome
        return ws

    def ai(self, user: str) -> ClientConnection:
        """A socket on `GET /ai` (the AI SDK's WebSocketChatTransport
        protocol) as `user`, its token in the query."""
        return connect(f"ws://{self.addr}/ai?token={mint_token(SECRET, user)}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture
def herald_server() -> Iterator[HeraldProcess]:
    server = HeraldProcess({})
    yield server
    server.stop()


def events(ws: ClientConnection, n: int) -> list:
    """The next `n` event frames (other frames skipped)."""
    out = []
    while len(out) < n:
        frame = json.loads(ws.recv(timeout=10))
        if frame["type"] == "event":
            out.append(frame)
    return out


def join_deltas(frames: list) -> list:
    """Event frames as what is promised of them, whatever Herald joined.

    Herald may join a run part's unsent text deltas into one frame covering
    `from_seq`…`seq` (their texts joined), live as in history, so how many
    frames a text takes is not promised. Asserts that the frames cover every
    seq once, in order (per stream: each frame's `from_seq`, or `seq`, is the
    previous frame's `seq` + 1; only a text delta covers more than one seq),
    and returns them with each series of consecutive `agent_text_delta`
    frames of one run and part joined into one covering frame, as Herald
    joins them: compare these, not frame counts."""
    last: Dict[str, int] = {}  # stream ("" the user's own) -> seq of its last frame
    out: list = []
    for f in frames:
        stream = f.get("stream", "")
        if "from_seq" in f:
            assert f["event"] == "agent_text_delta" and f["from_seq"] < f["seq"], f
        start = f.get("from_seq", f["seq"])
        if stream in last:
            assert start == last[stream] + 1, f"every seq once, in order: after {last[stream]}, {f}"
        last[stream] = f["seq"]
        prev = out[-1] if out else None
        if (
            prev is not None
            and f["event"] == "agent_text_delta"
            and prev["event"] == "agent_text_delta"
            and prev.get("stream", "") == stream
            and prev.get("run_id") == f.get("run_id")
            and prev["data"].get("part") == f["data"].get("part")
            and prev.get("replayed") == f.get("replayed")
        ):
            text = prev["data"]["text"] + f["data"]["text"]
            out[-1] = {**prev, "from_seq": prev.get("from_seq", prev["seq"]), "seq": f["seq"],
                       "data": {**prev["data"], "text": text}}
        else:
            out.append(f)
    return out


def covered(ws: ClientConnection, upto: int, first: Optional[int] = 1, timeout: float = 10,
            out: Optional[list] = None) -> list:
    """The event frames of `ws` (one stream's) until seq `upto` is covered,
    as they came (appended to `out` too, as they come). Asserts as it reads
    that they cover every seq from `first` (None: wherever the first frame
    starts) once, in order, and that the last one ends exactly at `upto`."""
    got: list = [] if out is None else out
    while not got or got[-1]["seq"] < upto:
        f = json.loads(ws.recv(timeout=timeout))
        if f["type"] != "event":
            continue
        if not got and first is not None:
            assert f.get("from_seq", f["seq"]) == first, f
        got.append(f)
        join_deltas(got[-2:])
        assert f.get("stream") == got[0].get("stream"), f
    assert got[-1]["seq"] == upto, got[-1]
    return got


def member(server: "HeraldProcess", user: str, grants: Dict[str, str], *streams: str) -> ClientConnection:
    """A socket of `user` whose token grants `grants` (minted with
    `mint_token(…, streams=…)`), subscribed to each of `streams`."""
    ws = connect(f"ws://{server.addr}/ws", subprotocols=["herald.v1"])  # type: ignore[list-item]
    ws.send(json.dumps({"type": "hello", "token": mint_token(SECRET, user, streams=grants)}))
    welcome = json.loads(ws.recv(timeout=10))
    assert welcome["type"] == "welcome", welcome
    for stream in streams:
        ws.send(json.dumps({"type": "subscribe", "stream": stream}))
        subscribed = frame(ws, "subscribed")
        assert subscribed["stream"] == stream, subscribed
    return ws


def frame(ws: ClientConnection, kind: str) -> Dict[str, Any]:
    """The next frame of type `kind` (others skipped; an `error` fails)."""
    while True:
        f = json.loads(ws.recv(timeout=10))
        if f["type"] == kind:
            return f
        assert f["type"] != "error", f


def ai_response(ws: ClientConnection, request_id: str) -> tuple:
    """One `/ai` response, read to its `end` or `error` frame: its chunks
    (checking that their sequences run 0, 1, 2, …) and that last frame."""
    chunks = []
    while True:
        frame = json.loads(ws.recv(timeout=15))
        if frame.get("requestId") != request_id:
            continue
        if frame["type"] == "chunk":
            assert frame["sequence"] == len(chunks), frame
            chunks.append(frame["chunk"])
        elif frame["type"] in ("end", "error"):
            return chunks, frame


class Hooked:
    """A `herald serve` whose webhook is a recorder in this process, signed
    with `secret`: `received` gets each request's (headers, body). With
    `answer`, each request is answered `answer(headers, body)` as JSON (an
    empty 200 otherwise); `env` adds to Herald's configuration."""

    def __init__(
        self,
        secret: str,
        answer: Optional[Callable[[Dict[str, str], bytes], Any]] = None,
        env: Optional[Dict[str, str]] = None,
    ) -> None:
        self.secret = secret
        self.received: "queue.Queue[tuple]" = queue.Queue()
        received = self.received

        class Hook(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                headers = dict(self.headers.items())
                received.put((headers, body))
                reply = b"" if answer is None else json.dumps(answer(headers, body)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        port = free_port()
        self.hook = http.server.HTTPServer(("127.0.0.1", port), Hook)
        threading.Thread(target=self.hook.serve_forever, daemon=True).start()
        self.server = HeraldProcess(
            {
                "HERALD_WEBHOOK_URL": f"http://127.0.0.1:{port}/hook",
                "HERALD_WEBHOOK_SECRET": secret,
                **(env or {}),
            }
        )

    def stop(self) -> None:
        self.server.stop()
        self.hook.shutdown()
