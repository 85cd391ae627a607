"""verify_webhook against Herald's real signed deliveries."""

from __future__ import annotations

import hashlib
import hmac
import json
import time

import pytest

from herald_gateway import (
    ChatRequest,
    InvalidSignature,
    SubscribeRequest,
    UserMessage,
    mint_token,
    verify_webhook,
)

from conftest import Hooked

HOOK_SECRET = "py-hook-secret-0123456789"


def test_real_deliveries_verify_and_tampering_does_not():
    hooked = Hooked(HOOK_SECRET)
    received, server = hooked.received, hooked.server
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
        hooked.stop()


def test_minted_tokens_are_accepted(herald_server):
    ws = herald_server.ws("gia")
    ws.close()
    assert mint_token("s", "u").count(".") == 2


# --- malformed requests: InvalidSignature, never another exception ---------

NOW = 1_800_000_000
BODY = json.dumps(
    {"type": "user_message", "user_id": "u1", "thread_id": "t1", "message_id": "m1", "text": "hi"}
).encode()


def _sign(ts: str, delivery: str, body: bytes, secret: str = HOOK_SECRET) -> str:
    mac = hmac.new(secret.encode(), ts.encode() + b"." + delivery.encode() + b"." + body, hashlib.sha256)
    return "v2=" + mac.hexdigest()


def _headers(ts: object = str(NOW), delivery: object = "d1", signature: object = None) -> dict:
    if signature is None:
        signature = _sign(str(ts), str(delivery), BODY)
    out = {}
    for name, value in (
        ("X-Herald-Timestamp", ts),
        ("X-Herald-Delivery", delivery),
        ("X-Herald-Signature", signature),
    ):
        if value is not MISSING:
            out[name] = value
    return out


MISSING = object()
GOOD = _sign(str(NOW), "d1", BODY)

MALFORMED = {
    # The timestamp: missing, empty, digits str.isdigit() accepts and int()
    # refuses or reads as another number, signs, spaces, huge.
    "ts missing": (_headers(ts=MISSING), BODY),
    "ts empty": (_headers(ts=""), BODY),
    "ts superscript two": (_headers(ts="²"), BODY),
    "ts superscript in digits": (_headers(ts=f"{NOW}²"), BODY),
    "ts arabic-indic digits": (_headers(ts="١٨٠٠٠٠٠٠٠٠"), BODY),
    "ts fullwidth digits": (_headers(ts="１８００００００００"), BODY),
    "ts negative": (_headers(ts=f"-{NOW}"), BODY),
    "ts plus sign": (_headers(ts=f"+{NOW}"), BODY),
    "ts spaces": (_headers(ts=f" {NOW} "), BODY),
    "ts underscore": (_headers(ts="1_800_000_000"), BODY),
    "ts float": (_headers(ts=f"{NOW}.5"), BODY),
    "ts 5000 digits": (_headers(ts="9" * 5000), BODY),
    "ts not text": (_headers(ts=NOW), BODY),
    # The delivery id: missing, empty, not text.
    "delivery missing": (_headers(delivery=MISSING), BODY),
    "delivery empty": (_headers(delivery=""), BODY),
    "delivery not text": (_headers(delivery=7, signature=GOOD), BODY),
    "delivery lone surrogate": (_headers(delivery="d\udc80", signature=GOOD), BODY),
    # The signature: missing, empty, other schemes, non-ASCII, non-hex, lengths.
    "sig missing": (_headers(signature=MISSING), BODY),
    "sig empty": (_headers(signature=""), BODY),
    "sig prefix only": (_headers(signature="v2="), BODY),
    "sig v1 scheme": (_headers(signature="v1=" + GOOD[3:]), BODY),
    "sig no scheme": (_headers(signature=GOOD[3:]), BODY),
    "sig non-ascii": (_headers(signature="v2=é"), BODY),
    "sig non-ascii of right length": (_headers(signature="v2=" + "é" * 64), BODY),
    "sig non-ascii digits": (_headers(signature="v2=" + "٣" * 64), BODY),
    "sig non-hex": (_headers(signature="v2=" + "g" * 64), BODY),
    "sig one short": (_headers(signature=GOOD[:-1]), BODY),
    "sig one long": (_headers(signature=GOOD + "0"), BODY),
    "sig doubled": (_headers(signature=GOOD + "," + GOOD), BODY),
    "sig nul": (_headers(signature=GOOD[:-1] + "\x00"), BODY),
    "sig wrong": (_headers(signature="v2=" + "0" * 64), BODY),
    "sig not text": (_headers(signature=12345), BODY),
    "sig bytes non-ascii": (_headers(signature="v2=".encode() + "é".encode() * 32), BODY),
    # The headers and the body themselves.
    "headers none": (None, BODY),
    "headers a number": (5, BODY),
    "headers a string": ("x-herald-timestamp", BODY),
    "headers bad pairs": ([("x-herald-timestamp",)], BODY),
    "header name not text": ({5: "x", **_headers()}, BODY),
    "body none": (_headers(), None),
    "body a number": (_headers(), 5),
    "body tampered": (_headers(), BODY.replace(b"hi", b"ho")),
    "body lone surrogate": (_headers(), "\udc80"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_every_malformed_request_is_an_invalid_signature(case):
    headers, body = MALFORMED[case]
    with pytest.raises(InvalidSignature):
        verify_webhook(HOOK_SECRET, headers, body, now=NOW)


def _signed(payload: object) -> tuple:
    body = json.dumps(payload).encode() if not isinstance(payload, bytes) else payload
    return {"x-herald-timestamp": str(NOW), "x-herald-delivery": "d2",
            "x-herald-signature": _sign(str(NOW), "d2", body)}, body


SIGNED_BUT_NOT_AN_EVENT = {
    "not json": b"{",
    "not utf-8": b"\xff\xfe",
    "a list": [1],
    "a string": "user_message",
    "no user_id": {"type": "user_message", "thread_id": "t", "message_id": "m", "text": "x"},
    "user_id a number": {"type": "cancel", "user_id": 5, "run_id": "r"},
    "data a list": {"type": "user_message", "user_id": "u", "thread_id": "t", "message_id": "m",
                    "text": "x", "data": [1]},
}


@pytest.mark.parametrize("case", SIGNED_BUT_NOT_AN_EVENT)
def test_a_signed_body_that_is_not_an_event_is_an_invalid_signature(case):
    headers, body = _signed(SIGNED_BUT_NOT_AN_EVENT[case])
    with pytest.raises(InvalidSignature):
        verify_webhook(HOOK_SECRET, headers, body, now=NOW)


def test_well_formed_requests_verify_whatever_their_types():
    headers = _headers()
    expected = verify_webhook(HOOK_SECRET, headers, BODY, now=NOW)
    assert (expected.user_id, expected.delivery_id) == ("u1", "d1")
    as_bytes = {k.encode(): v.encode() for k, v in headers.items()}
    as_pairs = [(k.lower().encode(), v.encode()) for k, v in headers.items()]  # ASGI's raw headers
    upper = {**headers, "X-Herald-Signature": "v2=" + GOOD[3:].upper()}
    for h, body, secret in [
        (as_bytes, BODY, HOOK_SECRET),
        (as_pairs, BODY, HOOK_SECRET),
        (upper, BODY, HOOK_SECRET),
        (headers, BODY.decode(), HOOK_SECRET),
        (headers, bytearray(BODY), HOOK_SECRET.encode()),
    ]:
        assert verify_webhook(secret, h, body, now=NOW) == expected


# --- chat_request: an AI SDK chat turn (GET /ai) ----------------------------

CHAT = {
    "type": "chat_request",
    "user_id": "u1",
    "chat_id": "chat1",
    "run_id": "run_0123456789abcdef01234567",
    "trigger": "regenerate-message",
    "message_id": "m2",
    "messages": [
        {"id": "m1", "role": "user", "parts": [{"type": "text", "text": "hi"}]},
        {"id": "m2", "role": "assistant", "parts": [{"type": "text", "text": "hello"}]},
    ],
    "body": {"model": "small", "n": [1, 2]},
    "metadata": {"source": "tests", "k": [None, 1.5]},
    "conn_id": "c1",
    "received_at": "2026-12-06T16:00:00.000Z",
}


def test_a_chat_request_parses_with_every_field():
    headers, body = _signed(CHAT)
    event = verify_webhook(HOOK_SECRET, headers, body, now=NOW)
    assert isinstance(event, ChatRequest)
    assert event == ChatRequest(
        user_id="u1",
        chat_id="chat1",
        run_id="run_0123456789abcdef01234567",
        trigger="regenerate-message",
        message_id="m2",
        messages=CHAT["messages"],
        body={"model": "small", "n": [1, 2]},
        metadata={"source": "tests", "k": [None, 1.5]},
        conn_id="c1",
        received_at="2026-12-06T16:00:00.000Z",
        delivery_id="d2",
    )
    assert (event.thread_id, event.text) == ("chat1", "hi")


def test_a_chat_request_as_herald_sends_a_submit_and_its_defaults():
    # Herald's own shape for a submit: message_id and metadata null.
    sent = {**CHAT, "trigger": "submit-message", "message_id": None, "metadata": None, "body": {}}
    event = verify_webhook(HOOK_SECRET, *_signed(sent), now=NOW)
    assert isinstance(event, ChatRequest)
    assert (event.trigger, event.message_id, event.metadata, event.body) == (
        "submit-message", None, None, {},
    )
    # Optional fields left out: their defaults.
    minimal = {k: CHAT[k] for k in ("type", "user_id", "chat_id", "run_id", "trigger", "messages")}
    event = verify_webhook(HOOK_SECRET, *_signed(minimal), now=NOW)
    assert isinstance(event, ChatRequest)
    assert (event.message_id, event.body, event.metadata, event.conn_id, event.received_at) == (
        None, {}, None, "", "",
    )
    assert event.delivery_id == "d2"
    # Metadata is any JSON, kept as it came; a null body is an empty one.
    for metadata in ("note", 7, [1, "x"], False):
        event = verify_webhook(HOOK_SECRET, *_signed({**CHAT, "metadata": metadata}), now=NOW)
        assert event.metadata == metadata
    assert verify_webhook(HOOK_SECRET, *_signed({**CHAT, "body": None}), now=NOW).body == {}
    assert verify_webhook(HOOK_SECRET, *_signed({**CHAT, "messages": []}), now=NOW).text == ""


def _without(name: str) -> dict:
    return {k: v for k, v in CHAT.items() if k != name}


MALFORMED_CHAT = {
    **{f"no {name}": _without(name) for name in ("user_id", "chat_id", "run_id", "trigger", "messages")},
    **{
        f"{name} {kind}": {**CHAT, name: value}
        for name in ("user_id", "chat_id", "run_id", "trigger")
        for kind, value in (("null", None), ("a number", 5), ("a list", ["x"]), ("an object", {}))
    },
    "message_id a number": {**CHAT, "message_id": 5},
    "message_id an object": {**CHAT, "message_id": {"id": "m1"}},
    "message_id false": {**CHAT, "message_id": False},
    "messages null": {**CHAT, "messages": None},
    "messages an object": {**CHAT, "messages": {"id": "m1"}},
    "messages a string": {**CHAT, "messages": "hi"},
    "messages of strings": {**CHAT, "messages": ["hi"]},
    "messages with a null": {**CHAT, "messages": [CHAT["messages"][0], None]},
    "messages with a list": {**CHAT, "messages": [[CHAT["messages"][0]]]},
    "body a list": {**CHAT, "body": [1]},
    "body a string": {**CHAT, "body": "{}"},
    "body a number": {**CHAT, "body": 0},
    "conn_id a number": {**CHAT, "conn_id": 5},
    "conn_id null": {**CHAT, "conn_id": None},
    "received_at a number": {**CHAT, "received_at": 1_800_000_000},
}


@pytest.mark.parametrize("case", MALFORMED_CHAT)
def test_a_malformed_chat_request_is_an_invalid_signature(case):
    headers, body = _signed(MALFORMED_CHAT[case])
    with pytest.raises(InvalidSignature):
        verify_webhook(HOOK_SECRET, headers, body, now=NOW)


def _chat(*messages: dict) -> ChatRequest:
    return ChatRequest("u", "c", "r", "submit-message", None, list(messages))


def test_a_chat_requests_text_is_its_last_user_messages_text():
    text = lambda t: {"type": "text", "text": t}  # noqa: E731
    chat = _chat(
        {"id": "1", "role": "user", "parts": [text("first")]},
        {"id": "2", "role": "assistant", "parts": [text("answer")]},
        {
            "id": "3",
            "role": "user",
            "parts": [
                text("line one"),
                {"type": "file", "mediaType": "image/png", "url": "data:,"},
                {"type": "step-start"},
                text(""),
                text("line two"),
            ],
        },
        {"id": "4", "role": "assistant", "parts": [text("being regenerated")]},
    )
    assert chat.text == "line one\n\nline two"
    assert chat.thread_id == "c"
    # No user message, or nothing readable in it: no text.
    assert _chat().text == ""
    assert _chat({"id": "1", "role": "assistant", "parts": [text("x")]}).text == ""
    assert _chat({"id": "1", "role": "system", "parts": [text("x")]}).text == ""
    assert _chat({"id": "1", "role": "user", "parts": [{"type": "file", "url": "u"}]}).text == ""
    # Whatever the client sent, the property never raises.
    odd = _chat(
        {"id": "1", "role": "user", "parts": [text("kept")]},
        {"id": "2", "role": "user", "parts": [None, "x", {"type": "text"}, {"type": "text", "text": 5}, text("ok")]},
    )
    assert odd.text == "ok"
    assert _chat({"id": "1", "role": "user"}).text == ""
    assert _chat({"id": "1", "role": "user", "parts": "hi"}).text == ""


def test_a_subscribe_request_parses_and_its_answers():
    payload = {"type": "subscribe_request", "user_id": "ana", "stream": "thread:t1",
               "conn_id": "c1", "received_at": "2026-12-06T16:00:00.000Z"}
    assert verify_webhook(HOOK_SECRET, *_signed(payload), now=NOW) == SubscribeRequest(
        "ana", "thread:t1", "c1", "2026-12-06T16:00:00.000Z", "d2"
    )
    for missing in ("user_id", "stream"):
        headers, body = _signed({k: v for k, v in payload.items() if k != missing})
        with pytest.raises(InvalidSignature):
            verify_webhook(HOOK_SECRET, headers, body, now=NOW)
    assert SubscribeRequest.allow() == {"allow": True}
    assert SubscribeRequest.allow(write=True) == {"allow": True, "write": True}
    assert SubscribeRequest.deny() == {"allow": False}


def test_an_unknown_verified_type_is_still_a_value_error():
    headers, body = _signed({**CHAT, "type": "chat_request_v2"})
    with pytest.raises(ValueError, match="unknown webhook type") as e:
        verify_webhook(HOOK_SECRET, headers, body, now=NOW)
    assert not isinstance(e.value, InvalidSignature)
