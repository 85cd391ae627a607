"""verify_webhook against Herald's real signed deliveries."""

from __future__ import annotations

import http.server
import json
import queue
import threading
import time

import pytest

from herald_gateway import InvalidSignature, UserMessage, mint_token, verify_webhook

from conftest import HeraldProcess, free_port

HOOK_SECRET = "py-hook-secret-0123456789"


def test_real_deliveries_verify_and_tampering_does_not():
    received: "queue.Queue[tuple]" = queue.Queue()

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.put((dict(self.headers.items()), body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    port = free_port()
    hook = http.server.HTTPServer(("127.0.0.1", port), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    server = HeraldProcess(
        {
            "HERALD_WEBHOOK_URL": f"http://127.0.0.1:{port}/hook",
            "HERALD_WEBHOOK_SECRET": HOOK_SECRET,
        }
    )
    try:
        ws = server.ws("fay")
        ws.send(json.dumps({"type": "user_message", "id": "m1", "thread_id": "t1", "text": "hi"}))
        headers, body = received.get(timeout=10)
        event = verify_webhook(HOOK_SECRET, headers, body)
        assert isinstance(event, UserMessage)
        assert (event.user_id, event.message_id, event.thread_id, event.text) == (
            "fay", "m1", "t1", "hi",
        )
        assert event.delivery_id
        # Header names in another case are found too.
        lower = {k.lower(): v for k, v in headers.items()}
        assert verify_webhook(HOOK_SECRET, lower, body) == event
        with pytest.raises(InvalidSignature):
            verify_webhook(HOOK_SECRET, headers, body.replace(b"hi", b"ho"))
        with pytest.raises(InvalidSignature):
            verify_webhook("another-secret", headers, body)
        with pytest.raises(InvalidSignature):
            verify_webhook(HOOK_SECRET, headers, body, now=time.time() + 3600)
        # The delivery id is signed: a replay under a new id, or without
        # one, does not verify.
        replayed = {**lower, "x-herald-delivery": "0" * 32}
        with pytest.raises(InvalidSignature):
            verify_webhook(HOOK_SECRET, replayed, body)
        missing = {k: v for k, v in lower.items() if k != "x-herald-delivery"}
        with pytest.raises(InvalidSignature):
            verify_webhook(HOOK_SECRET, missing, body)
    finally:
        server.stop()
        hook.shutdown()


def test_minted_tokens_are_accepted(herald_server):
    ws = herald_server.ws("gia")
    ws.close()
    assert mint_token("s", "u").count(".") == 2
