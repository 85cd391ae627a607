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


class TextStreamError(HeraldError):
    """A run's text (``run.text``) could not be delivered: Herald refused a
    line (413 ``line_too_large``, 400 ``invalid_line`` …) or the stream was
    still not confirmed after the retries (``status`` 0 when Herald never
    answered). It escapes the run's ``with`` block after the run was ended
    with ``agent_error``: the answer did not go out. ``run_id`` names the run.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: Optional[str] = None,
        *,
        run_id: str = "",
    ) -> None:
        super().__init__(status, code, message, field)
        self.run_id = run_id

    @classmethod
    def of(cls, error: HeraldError, run_id: str) -> "TextStreamError":
        """The text stream's error for ``error`` (Herald's answer, or none)."""
        return cls(error.status, error.code, error.message, error.field, run_id=run_id)


class InvalidSignature(Exception):
    """A webhook request whose signature is missing, wrong or stale."""
