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


def _header(headers: Mapping[str, str], name: str) -> Optional[str]:
    getter = getattr(headers, "get", None)
    if getter is not None:
        value = getter(name)
        if value is None:
            value = getter(name.title())
        if value is not None:
            return str(value)
    for key, value in headers.items():
        if key.lower() == name:
            return str(value)
    return None


def verify_webhook(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance: int = 300,
    now: Optional[float] = None,
) -> WebhookEvent:
    """Check a webhook request's signature and parse it.

    ``headers`` is any mapping of the request's headers (looked up
    case-insensitively) and ``body`` the raw request body, byte for byte as
    received. Raises :class:`InvalidSignature` when the signature is missing or
    wrong (compared in constant time), the delivery id is missing, or the
    timestamp is more than ``tolerance`` seconds away from ``now``.

    The signature (``v2=``) covers the timestamp, the delivery id and the
    body, so deduplicating on ``delivery_id`` is safe: a captured request
    replayed under a new delivery id does not verify.
    """
    timestamp = _header(headers, TIMESTAMP_HEADER)
    signature = _header(headers, SIGNATURE_HEADER)
    delivery = _header(headers, DELIVERY_HEADER)
    if timestamp is None or not timestamp.isdigit():
        raise InvalidSignature("missing or malformed X-Herald-Timestamp")
    current = time.time() if now is None else now
    if abs(current - int(timestamp)) > tolerance:
        raise InvalidSignature("timestamp outside the tolerance window")
    if delivery is None:
        raise InvalidSignature("missing X-Herald-Delivery")
    if signature is None or not signature.startswith("v2="):
        raise InvalidSignature("missing or malformed X-Herald-Signature")
    expected = hmac.new(
        secret.encode(),
        timestamp.encode() + b"." + delivery.encode() + b"." + body,
        hashlib.sha256,
    ).hexdigest()
    if not hmac.compare_digest(expected, signature[3:]):
        raise InvalidSignature("signature mismatch")
    try:
        payload = json.loads(body)
    except ValueError as e:
        raise InvalidSignature(f"signed body is not JSON: {e}") from e
    kind = payload.get("type")
    if kind == "user_message":
        return UserMessage(
            user_id=payload["user_id"],
            thread_id=payload["thread_id"],
            message_id=payload["message_id"],
            text=payload["text"],
            data=payload.get("data") or {},
            conn_id=payload.get("conn_id", ""),
            received_at=payload.get("received_at", ""),
            delivery_id=delivery,
        )
    if kind == "cancel":
        return Cancel(
            user_id=payload["user_id"],
            run_id=payload["run_id"],
            conn_id=payload.get("conn_id", ""),
            received_at=payload.get("received_at", ""),
            delivery_id=delivery,
        )
    raise ValueError(f"unknown webhook type {kind!r}")
