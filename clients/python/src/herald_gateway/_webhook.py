"""Verifying Herald's webhook requests (user messages and cancels)."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Union

from ._errors import InvalidSignature

SIGNATURE_HEADER = "x-herald-signature"
TIMESTAMP_HEADER = "x-herald-timestamp"
DELIVERY_HEADER = "x-herald-delivery"


@dataclass(frozen=True)
class UserMessage:
    """A chat message a user sent to the agent."""

    user_id: str
    thread_id: str
    message_id: str
    text: str
    data: Dict[str, Any] = field(default_factory=dict)
    conn_id: str = ""
    received_at: str = ""
    delivery_id: Optional[str] = None


@dataclass(frozen=True)
class Cancel:
    """A user asked the agent to stop a run."""

    user_id: str
    run_id: str
    conn_id: str = ""
    received_at: str = ""
    delivery_id: Optional[str] = None


WebhookEvent = Union[UserMessage, Cancel]


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


def verify_webhook(
    secret: Union[str, bytes],
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance: int = 300,
    now: Optional[float] = None,
) -> WebhookEvent:
    """Check a webhook request's signature and parse it.

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
    data = payload.get("data")
    if kind == "user_message":
        if data is not None and not isinstance(data, dict):
            raise InvalidSignature("signed body: `data` is not an object")
        return UserMessage(
            user_id=_field(payload, "user_id"),
            thread_id=_field(payload, "thread_id"),
            message_id=_field(payload, "message_id"),
            text=_field(payload, "text"),
            data=data or {},
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
        )
    raise ValueError(f"unknown webhook type {kind!r}")
