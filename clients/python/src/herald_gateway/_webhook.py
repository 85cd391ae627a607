"""Verifying Herald's webhook requests (user messages, AI SDK chat turns,
cancels and subscribe requests)."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Union

from ._errors import InvalidSignature

SIGNATURE_HEADER = "x-herald-signature"
TIMESTAMP_HEADER = "x-herald-timestamp"
DELIVERY_HEADER = "x-herald-delivery"


@dataclass(frozen=True)
class UserMessage:
    """A chat message a user sent to the agent."""

    #: The sender.
    user_id: str
    thread_id: str
    message_id: str
    text: str
    data: Dict[str, Any] = field(default_factory=dict)
    conn_id: str = ""
    received_at: str = ""
    delivery_id: Optional[str] = None
    #: The shared stream it was written to (``"thread:t1"``): every member
    #: saw the question there, and ``herald.run(message)`` answers there.
    #: ``None`` for a message to the sender's own stream.
    stream: Optional[str] = None


@dataclass(frozen=True)
class ChatRequest:
    """A turn of an AI SDK chat (``useChat`` on Herald's ``GET /ai``).

    Herald has already opened run :attr:`run_id` (its ``agent_started`` is
    published) in thread :attr:`chat_id`; the backend answers by publishing
    that run's events — ``herald.run(request)`` is a run of exactly that
    run id and thread that does not publish ``agent_started`` again. A
    ``cancel`` for :attr:`run_id` follows when the user presses Stop.
    """

    user_id: str
    chat_id: str
    #: Herald's run id: every event of the answer carries it.
    run_id: str
    #: ``"submit-message"`` or ``"regenerate-message"``.
    trigger: str
    #: The message to regenerate (``regenerate-message``), or ``None``.
    message_id: Optional[str]
    #: The chat's AI SDK UI messages as the client sent them (objects with
    #: ``id``, ``role`` and ``parts``).
    messages: List[Dict[str, Any]]
    #: The transport's ``body`` (an object).
    body: Dict[str, Any] = field(default_factory=dict)
    #: The transport's ``metadata`` (any JSON; ``None`` when absent).
    metadata: Any = None
    conn_id: str = ""
    received_at: str = ""
    delivery_id: Optional[str] = None

    @property
    def thread_id(self) -> str:
        """The chat id: the thread of the run's events."""
        return self.chat_id

    @property
    def text(self) -> str:
        """The text of the last user message: its ``text`` parts joined with
        newlines (``""`` when there is none)."""
        for message in reversed(self.messages):
            if message.get("role") == "user":
                parts = message.get("parts")
                if not isinstance(parts, list):
                    return ""
                return "\n".join(
                    part["text"]
                    for part in parts
                    if isinstance(part, dict)
                    and part.get("type") == "text"
                    and isinstance(part.get("text"), str)
                )
        return ""


@dataclass(frozen=True)
class Cancel:
    """A user asked the agent to stop a run."""

    #: Who asked: the run's user, or, for a run of a shared stream, any
    #: member who may write to it.
    user_id: str
    run_id: str
    conn_id: str = ""
    received_at: str = ""
    delivery_id: Optional[str] = None
    #: The shared stream the run is in; ``None`` for the user's own stream.
    stream: Optional[str] = None


@dataclass(frozen=True)
class SubscribeRequest:
    """A socket asked to subscribe to a shared stream its token does not
    grant (Herald's ``subscribe_proxy``): the webhook's answer decides.

    Answer the request itself (not in the background) with
    :meth:`allow` or :meth:`deny` as the JSON body — e.g.
    ``return SubscribeRequest.allow(write=True)`` from a FastAPI handler.
    Herald keeps the answer for ``subscribe_cache_ttl`` per user and stream.
    """

    user_id: str
    #: The shared stream asked for (``"thread:t1"``).
    stream: str
    conn_id: str = ""
    received_at: str = ""
    delivery_id: Optional[str] = None

    @staticmethod
    def allow(write: bool = False) -> Dict[str, bool]:
        """The answer that grants the stream: read, or read and write."""
        return {"allow": True, "write": True} if write else {"allow": True}

    @staticmethod
    def deny() -> Dict[str, bool]:
        """The answer that refuses the stream (the socket gets ``forbidden``)."""
        return {"allow": False}


WebhookEvent = Union[UserMessage, ChatRequest, Cancel, SubscribeRequest]


#: Longest timestamp accepted: unix seconds have 10 digits for centuries.
_MAX_TIMESTAMP_DIGITS = 15
_HEX = frozenset("0123456789abcdefABCDEF")


def _text(value: Any, what: str) -> str:
    """A header value (or name) as text: ``str``, or bytes as HTTP carries
    them (latin-1, as Starlette and http.server decode them)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("latin-1")
    raise InvalidSignature(f"{what} is not text: {type(value).__name__}")


def _header(headers: Any, name: str) -> Optional[str]:
    """The header ``name`` (lower case), looked up case-insensitively in a
    mapping or a sequence of pairs (ASGI's raw headers); ``None`` when absent."""
    items = headers.items() if hasattr(headers, "items") else headers
    try:
        pairs = list(items)
    except TypeError as e:
        raise InvalidSignature(f"headers are not a mapping: {type(headers).__name__}") from e
    for pair in pairs:
        try:
            key, value = pair
        except (TypeError, ValueError) as e:
            raise InvalidSignature("headers are not name/value pairs") from e
        if _text(key, "a header name").lower() == name:
            return _text(value, name)
    return None


def _bytes(value: Any, what: str) -> bytes:
    """The body or the secret as bytes (text is taken as UTF-8)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates
            raise InvalidSignature(f"{what} is not valid text") from e
    raise InvalidSignature(f"{what} is not bytes: {type(value).__name__}")


def _timestamp(value: Optional[str]) -> str:
    # ASCII digits only: str.isdigit() accepts '²' or '١', which int() refuses
    # or reads as another number; and a bounded length (int() refuses over
    # 4,300 digits).
    if (
        value is None
        or not 0 < len(value) <= _MAX_TIMESTAMP_DIGITS
        or not value.isascii()
        or not value.isdigit()
    ):
        raise InvalidSignature("missing or malformed X-Herald-Timestamp")
    return value


def _signature(value: Optional[str]) -> bytes:
    """The hex MAC of a ``v2=<64 hex digits>`` signature, lower case."""
    if value is None or not value.startswith("v2="):
        raise InvalidSignature("missing or malformed X-Herald-Signature")
    mac = value[3:]
    if len(mac) != 64 or not _HEX.issuperset(mac):
        raise InvalidSignature("malformed X-Herald-Signature: not 64 hex digits")
    return mac.lower().encode("ascii")


def _field(payload: Dict[str, Any], name: str, default: Optional[str] = None) -> str:
    value = payload.get(name, default)
    if not isinstance(value, str):
        raise InvalidSignature(f"signed body: `{name}` is missing or not a string")
    return value


def _optional_field(payload: Dict[str, Any], name: str) -> Optional[str]:
    value = payload.get(name)
    if value is not None and not isinstance(value, str):
        raise InvalidSignature(f"signed body: `{name}` is not a string or null")
    return value


def _object(payload: Dict[str, Any], name: str) -> Dict[str, Any]:
    """An optional object field (``{}`` when missing or null)."""
    value = payload.get(name)
    if value is not None and not isinstance(value, dict):
        raise InvalidSignature(f"signed body: `{name}` is not an object")
    return value or {}


def _messages(payload: Dict[str, Any]) -> List[Dict[str, Any]]:
    value = payload.get("messages")
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise InvalidSignature("signed body: `messages` is missing or not a list of objects")
    return value


def verify_webhook(
    secret: Union[str, bytes],
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance: int = 300,
    now: Optional[float] = None,
) -> WebhookEvent:
    """Check a webhook request's signature and parse it: a
    :class:`UserMessage`, a :class:`ChatRequest`, a :class:`Cancel` or a
    :class:`SubscribeRequest`.

    ``headers`` is any mapping of the request's headers (looked up
    case-insensitively), or a sequence of ``(name, value)`` pairs; values may
    be ``str`` or ``bytes``. ``body`` is the raw request body, byte for byte
    as received. Raises :class:`InvalidSignature` — and nothing else — for
    any request that does not verify: a signature missing, malformed or
    wrong (compared in constant time), a delivery id missing or empty, a
    timestamp that is not ASCII digits or is more than ``tolerance`` seconds
    away from ``now``, or a signed body that is not a Herald event. (A
    verified event of a type this SDK does not know raises ``ValueError``.)

    The signature (``v2=``) covers the timestamp, the delivery id and the
    body, so deduplicating on ``delivery_id`` is safe: a captured request
    replayed under a new delivery id does not verify.
    """
    key = _bytes(secret, "the secret")
    raw = _bytes(body, "the body")
    timestamp = _timestamp(_header(headers, TIMESTAMP_HEADER))
    current = time.time() if now is None else now
    if abs(current - int(timestamp)) > tolerance:
        raise InvalidSignature("timestamp outside the tolerance window")
    delivery = _header(headers, DELIVERY_HEADER)
    if not delivery:
        raise InvalidSignature("missing X-Herald-Delivery")
    signature = _signature(_header(headers, SIGNATURE_HEADER))
    signed = timestamp.encode("ascii") + b"." + _bytes(delivery, "X-Herald-Delivery") + b"." + raw
    expected = hmac.new(key, signed, hashlib.sha256).hexdigest().encode("ascii")
    if not hmac.compare_digest(expected, signature):
        raise InvalidSignature("signature mismatch")
    try:
        payload = json.loads(raw)
    except ValueError as e:  # also a body that is not UTF-8
        raise InvalidSignature(f"signed body is not JSON: {e}") from e
    if not isinstance(payload, dict):
        raise InvalidSignature("signed body is not a JSON object")
    kind = payload.get("type")
    if kind == "user_message":
        return UserMessage(
            user_id=_field(payload, "user_id"),
            thread_id=_field(payload, "thread_id"),
            message_id=_field(payload, "message_id"),
            text=_field(payload, "text"),
            data=_object(payload, "data"),
            conn_id=_field(payload, "conn_id", ""),
            received_at=_field(payload, "received_at", ""),
            delivery_id=delivery,
            stream=_optional_field(payload, "stream"),
        )
    if kind == "chat_request":
        return ChatRequest(
            user_id=_field(payload, "user_id"),
            chat_id=_field(payload, "chat_id"),
            run_id=_field(payload, "run_id"),
            trigger=_field(payload, "trigger"),
            message_id=_optional_field(payload, "message_id"),
            messages=_messages(payload),
            body=_object(payload, "body"),
            metadata=payload.get("metadata"),
            conn_id=_field(payload, "conn_id", ""),
            received_at=_field(payload, "received_at", ""),
            delivery_id=delivery,
        )
    if kind == "cancel":
        return Cancel(
            user_id=_field(payload, "user_id"),
            run_id=_field(payload, "run_id"),
            conn_id=_field(payload, "conn_id", ""),
            received_at=_field(payload, "received_at", ""),
            delivery_id=delivery,
            stream=_optional_field(payload, "stream"),
        )
    if kind == "subscribe_request":
        return SubscribeRequest(
            user_id=_field(payload, "user_id"),
            stream=_field(payload, "stream"),
            conn_id=_field(payload, "conn_id", ""),
            received_at=_field(payload, "received_at", ""),
            delivery_id=delivery,
        )
    raise ValueError(f"unknown webhook type {kind!r}")
