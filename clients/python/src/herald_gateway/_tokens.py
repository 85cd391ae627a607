"""Minting HS256 client tokens (JWT) without extra dependencies."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def mint_token(secret: str, user_id: str, *, ttl: int = 3600, **claims: Any) -> str:
    """An HS256 JWT for ``user_id`` (``sub``) valid for ``ttl`` seconds.

    Extra ``claims`` (``aud``, ``iss``, …) are added as given. Use it in
    development, or in a backend that issues browser tokens for Herald.
    """
    header = {"alg": "HS256", "typ": "JWT"}
    payload = {"sub": user_id, "exp": int(time.time()) + int(ttl), **claims}
    signing_input = (
        _b64(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + _b64(json.dumps(payload, separators=(",", ":")).encode())
    )
    signature = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + _b64(signature)
