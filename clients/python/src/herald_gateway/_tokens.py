"""Minting HS256 client tokens (JWT) without extra dependencies."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any, Mapping, Optional

#: What a ``streams`` grant may be: read, or read and write.
_GRANTS = ("r", "rw")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def mint_token(
    secret: str,
    user_id: str,
    *,
    ttl: int = 3600,
    streams: Optional[Mapping[str, str]] = None,
    **claims: Any,
) -> str:
    """An HS256 JWT for ``user_id`` (``sub``) valid for ``ttl`` seconds.

    ``streams`` is the shared streams the user may read (``"r"``) or read
    and write (``"rw"``), by name or by a prefix ending in ``*``:
    ``{"thread:t1": "rw", "room:acme.*": "r"}`` (the ``streams`` claim;
    another grant raises ``ValueError``). Extra ``claims`` (``aud``,
    ``iss``, …) are added as given. Use it in development, or in a backend
    that issues browser tokens for Herald.
    """
    header = {"alg": "HS256", "typ": "JWT"}
    payload = {"sub": user_id, "exp": int(time.time()) + int(ttl), **claims}
    if streams is not None:
        for name, grant in streams.items():
            if grant not in _GRANTS:
                raise ValueError(f"streams[{name!r}] is {grant!r}: a grant is 'r' or 'rw'")
        payload["streams"] = dict(streams)
    signing_input = (
        _b64(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + _b64(json.dumps(payload, separators=(",", ":")).encode())
    )
    signature = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + _b64(signature)
