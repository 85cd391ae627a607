"""Errors raised by the SDK."""

from __future__ import annotations

from typing import Optional


class HeraldError(Exception):
    """Herald refused a request (a 4xx), or it could not be done after retries.

    ``status`` is the HTTP status (0 when no answer arrived), ``code`` the
    machine-readable error (``invalid_field``, ``unauthorized``, …), ``field``
    the offending field when Herald named one, ``message`` Herald's text.
    """

    def __init__(
        self, status: int, code: str, message: str, field: Optional[str] = None
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.field = field


class InvalidSignature(Exception):
    """A webhook request whose signature is missing, wrong or stale."""
