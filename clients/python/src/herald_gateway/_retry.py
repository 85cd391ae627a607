"""How the clients retry and what a failed answer becomes: shared by the
publish API (``_client``) and the text streams (``_text``)."""

from __future__ import annotations

from typing import Optional

import httpx

from ._errors import HeraldError

#: Attempts of one request: the first and this many retries.
RETRIES = 4
#: First backoff; doubles per retry, capped at MAX_BACKOFF.
BACKOFF = 0.2
MAX_BACKOFF = 2.0


def delay(attempt: int) -> float:
    """The wait before retry number ``attempt + 1``."""
    return min(BACKOFF * (2 ** attempt), MAX_BACKOFF)


def error_of(response: Optional[httpx.Response], error: Optional[BaseException] = None) -> HeraldError:
    """The :class:`HeraldError` for Herald's error answer, or for no answer."""
    if response is None:
        return HeraldError(0, "unreachable", f"Herald did not answer: {error!r}")
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    return HeraldError(
        response.status_code,
        str(body.get("error", "http_error")),
        str(body.get("message", response.text)),
        body.get("field"),
    )
