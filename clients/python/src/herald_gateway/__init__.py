"""Herald SDK for agent backends.

- :class:`Herald` / :class:`AsyncHerald`: publish events (retried with an
  idempotency key, so never twice) to a user or to a shared stream
  (``stream="thread:t1"``), kick users, remove a user from a shared stream,
  see who is in one (:class:`Presence`), list connections, and run agent runs as context managers that are never
  left open.
- :func:`verify_webhook`: check and parse Herald's signed webhook requests
  (:class:`UserMessage`, :class:`ChatRequest` — an AI SDK chat turn, answered
  with ``herald.run(request)`` in the run Herald opened — :class:`Cancel`,
  :class:`SubscribeRequest` — answered with ``SubscribeRequest.allow()`` or
  ``.deny()``).
- :class:`HeraldError` (a refused or failed request), :class:`TextStreamError`
  (a run's text was not delivered), :class:`InvalidSignature` (a webhook
  request that does not verify).
- :func:`mint_token`: HS256 browser tokens for development (``streams=``:
  the shared streams the user may read or write).
"""

from ._client import AsyncHerald, Herald, Presence, PresenceUser, Published
from ._errors import HeraldError, InvalidSignature, TextStreamError
from ._runs import AsyncRun, AsyncToolCall, Run, ToolCall
from ._tokens import mint_token
from ._webhook import Cancel, ChatRequest, SubscribeRequest, UserMessage, WebhookEvent, verify_webhook

__all__ = [
    "AsyncHerald",
    "AsyncRun",
    "AsyncToolCall",
    "Cancel",
    "ChatRequest",
    "Herald",
    "HeraldError",
    "InvalidSignature",
    "Presence",
    "PresenceUser",
    "Published",
    "Run",
    "SubscribeRequest",
    "TextStreamError",
    "ToolCall",
    "UserMessage",
    "WebhookEvent",
    "mint_token",
    "verify_webhook",
]
