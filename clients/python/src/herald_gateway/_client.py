"""The HTTP clients: :class:`Herald` (blocking) and :class:`AsyncHerald` (asyncio)."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, overload

import httpx

from ._errors import HeraldError
from ._retry import RETRIES, delay, error_of
from ._runs import AsyncRun, Run, Target, _target


@dataclass(frozen=True)
class Published:
    """Where a published event landed."""

    seq: int
    epoch: str
    delivered: int
    duplicate: bool = False


@dataclass(frozen=True)
class PresenceUser:
    """One user in a shared stream: how many of their connections read it."""

    user_id: str
    connections: int


@dataclass(frozen=True)
class Presence:
    """Who is in a shared stream, on every node (:meth:`Herald.presence`)."""

    stream: str
    #: Sorted by id; at most the ``limit`` asked (default and cap: the
    #: server's ``presence_max_listed``, 100).
    users: List[PresenceUser]
    #: Every user in the stream, listed or not.
    total_users: int
    #: Every connection reading the stream.
    total_connections: int


def _presence(body: Any) -> Presence:
    return Presence(
        stream=str(body["stream"]),
        users=[PresenceUser(str(u["user_id"]), int(u["connections"])) for u in body["users"]],
        total_users=int(body["total_users"]),
        total_connections=int(body["total_connections"]),
    )


def _presence_params(stream: str, limit: Optional[int]) -> Dict[str, Any]:
    params: Dict[str, Any] = {"stream": stream}
    if limit is not None:
        params["limit"] = limit
    return params


def _destination(user_id: Optional[str], stream: Optional[str], what: str = "an event") -> Dict[str, str]:
    """Where an event goes: ``{"user_id": …}`` (the user's own stream) or
    ``{"stream": …}`` (a shared stream); exactly one of the two."""
    if (user_id is None) == (stream is None):
        raise TypeError(
            f"{what} goes to a user (user_id) or to a shared stream (stream): give exactly one, "
            f"not {'both' if user_id is not None else 'neither'}"
        )
    return {"user_id": user_id} if user_id is not None else {"stream": stream}  # type: ignore[dict-item]


def _event(
    user_id: Optional[str],
    event: Optional[str],
    data: Optional[Mapping[str, Any]],
    thread_id: Optional[str],
    run_id: Optional[str],
    idempotency_key: Optional[str],
    stream: Optional[str] = None,
    what: str = "an event",
) -> Dict[str, Any]:
    if event is None:
        raise TypeError(f"{what} needs its name (event)")
    body: Dict[str, Any] = {
        **_destination(user_id, stream, what),
        "event": event,
        # Every publish carries a key, so a retry never appends twice.
        "idempotency_key": idempotency_key or uuid.uuid4().hex,
    }
    if data is not None:
        body["data"] = dict(data)
    if thread_id is not None:
        body["thread_id"] = thread_id
    if run_id is not None:
        body["run_id"] = run_id
    return body


def _batch(events: Iterable[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    return [
        _event(
            e.get("user_id"),
            e.get("event"),
            e.get("data"),
            e.get("thread_id"),
            e.get("run_id"),
            e.get("idempotency_key"),
            e.get("stream"),
            f"events[{i}]",
        )
        for i, e in enumerate(events)
    ]


def _retryable(response: Optional[httpx.Response]) -> bool:
    return response is None or response.status_code >= 500 or response.status_code == 429


def _published(body: Any) -> List[Published]:
    return [
        Published(
            seq=int(r["seq"]),
            epoch=str(r["epoch"]),
            delivered=int(r.get("delivered", 0)),
            duplicate=bool(r.get("duplicate", False)),
        )
        for r in body["results"]
    ]


class Herald:
    """A blocking client of Herald's HTTP API.

    ``transport`` is an optional httpx transport (tests use it to inject faults).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 10.0,
        transport: Optional[httpx.BaseTransport] = None,
    ) -> None:
        #: The base timeout of a request; a text stream's attempt gets more
        #: for the lines it carries (see ``_text``).
        self._timeout = timeout
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout,
            transport=transport,
        )

    def __enter__(self) -> "Herald":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        last: Optional[BaseException] = None
        for attempt in range(RETRIES + 1):
            if attempt:
                time.sleep(delay(attempt - 1))
            try:
                response = self._http.request(method, path, **kwargs)
            except (httpx.TimeoutException, httpx.TransportError) as e:
                last = e
                continue
            if response.status_code < 400:
                return response.json()
            if not _retryable(response):
                raise error_of(response)
            last = error_of(response)
        if isinstance(last, HeraldError):
            raise last
        raise error_of(None, last)

    @overload
    def publish(
        self,
        user_id: str,
        event: str,
        *,
        data: Optional[Mapping[str, Any]] = ...,
        thread_id: Optional[str] = ...,
        run_id: Optional[str] = ...,
        idempotency_key: Optional[str] = ...,
    ) -> Published: ...

    @overload
    def publish(
        self,
        user_id: None = ...,
        *,
        event: str,
        stream: str,
        data: Optional[Mapping[str, Any]] = ...,
        thread_id: Optional[str] = ...,
        run_id: Optional[str] = ...,
        idempotency_key: Optional[str] = ...,
    ) -> Published: ...

    def publish(
        self,
        user_id: Optional[str] = None,
        event: Optional[str] = None,
        *,
        data: Optional[Mapping[str, Any]] = None,
        thread_id: Optional[str] = None,
        run_id: Optional[str] = None,
        idempotency_key: Optional[str] = None,
        stream: Optional[str] = None,
    ) -> Published:
        """Publish one event to ``user_id``'s stream, or with ``stream=`` to a
        shared stream (``publish(event="note", stream="thread:t1")``);
        exactly one of the two, else ``TypeError``. Retried safely."""
        body = _event(user_id, event, data, thread_id, run_id, idempotency_key, stream)
        return _published(self._request("POST", "/api/v1/events", json=body))[0]

    def publish_many(self, events: Iterable[Mapping[str, Any]]) -> List[Published]:
        """Publish a batch: each item has the keys of :meth:`publish`'s
        arguments (``user_id`` or ``stream``, exactly one)."""
        batch = _batch(events)
        return _published(self._request("POST", "/api/v1/events", json={"events": batch}))

    def unsubscribe(self, stream: str, user_id: str) -> int:
        """End every subscription of ``user_id`` to the shared ``stream``, on
        every node (each socket is told ``unsubscribed``, reason
        ``removed``); returns how many. What the user's token grants is
        unchanged: a token that still grants the stream may subscribe again."""
        body = self._request(
            "POST", "/api/v1/streams/unsubscribe", json={"stream": stream, "user_id": user_id}
        )
        return int(body["removed"])

    def presence(self, stream: str, limit: Optional[int] = None) -> Presence:
        """Who is in the shared ``stream``: its subscribers on every node,
        ``users`` sorted by id with their connection counts, at most
        ``limit`` of them (default and cap: the server's
        ``presence_max_listed``, 100); ``total_users`` and
        ``total_connections`` count everyone. A name Herald refuses is a
        :class:`HeraldError` with ``.field == "stream"``."""
        return _presence(
            self._request("GET", "/api/v1/streams/presence", params=_presence_params(stream, limit))
        )

    def disconnect(self, user_id: str) -> int:
        """Close every connection of ``user_id`` (4409); returns how many."""
        body = self._request("POST", "/api/v1/disconnect", json={"user_id": user_id})
        return int(body["disconnected"])

    def connections(self, user_id: Optional[str] = None) -> List[Dict[str, Any]]:
        """Describe live connections, of one user or all."""
        params = {"user_id": user_id} if user_id is not None else None
        return list(self._request("GET", "/api/v1/connections", params=params)["connections"])

    def run(
        self,
        user: Optional[Target] = None,
        *,
        thread_id: Optional[str] = None,
        run_id: Optional[str] = None,
        started: Optional[bool] = None,
        stream: Optional[str] = None,
    ) -> Run:
        """An agent run, as a context manager that is never left open.

        ``user`` is a user id, or the webhook event the run answers: a
        :class:`UserMessage` (its user and thread; a new run id unless
        ``run_id`` is given; its ``agent_started`` carries the message's id as
        ``message_id``, so Herald keeps the question with the run; a message
        written to a shared stream is answered in that stream) or a
        :class:`ChatRequest` (its user, Herald's
        ``run_id`` and ``thread_id`` = its ``chat_id``; neither may be
        passed). Instead of ``user``, ``stream="thread:t1"`` runs in a shared
        stream. ``started=True`` says Herald opened the run already, so
        entering it publishes no ``agent_started`` — the default for a
        ``ChatRequest``, whose run Herald opened; ``False`` otherwise.
        """
        return Run(self, *_target(user, thread_id, run_id, started, stream))


class AsyncHerald:
    """An asyncio client of Herald's HTTP API (same methods, awaitable)."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 10.0,
        transport: Optional[httpx.AsyncBaseTransport] = None,
    ) -> None:
        #: The base timeout of a request; a text stream's attempt gets more
        #: for the lines it carries (see ``_text``).
        self._timeout = timeout
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout,
            transport=transport,
        )

    async def __aenter__(self) -> "AsyncHerald":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        last: Optional[BaseException] = None
        for attempt in range(RETRIES + 1):
            if attempt:
                await asyncio.sleep(delay(attempt - 1))
            try:
                response = await self._http.request(method, path, **kwargs)
            except (httpx.TimeoutException, httpx.TransportError) as e:
                last = e
                continue
            if response.status_code < 400:
                return response.json()
            if not _retryable(response):
                raise error_of(response)
            last = error_of(response)
        if isinstance(last, HeraldError):
            raise last
        raise error_of(None, last)

    @overload
    async def publish(
        self,
        user_id: str,
        event: str,
        *,
        data: Optional[Mapping[str, Any]] = ...,
        thread_id: Optional[str] = ...,
        run_id: Optional[str] = ...,
        idempotency_key: Optional[str] = ...,
    ) -> Published: ...

    @overload
    async def publish(
        self,
        user_id: None = ...,
        *,
        event: str,
        stream: str,
        data: Optional[Mapping[str, Any]] = ...,
        thread_id: Optional[str] = ...,
        run_id: Optional[str] = ...,
        idempotency_key: Optional[str] = ...,
    ) -> Published: ...

    async def publish(
        self,
        user_id: Optional[str] = None,
        event: Optional[str] = None,
        *,
        data: Optional[Mapping[str, Any]] = None,
        thread_id: Optional[str] = None,
        run_id: Optional[str] = None,
        idempotency_key: Optional[str] = None,
        stream: Optional[str] = None,
    ) -> Published:
        """Publish one event to ``user_id``'s stream or to a shared
        ``stream`` (see :meth:`Herald.publish`)."""
        body = _event(user_id, event, data, thread_id, run_id, idempotency_key, stream)
        return _published(await self._request("POST", "/api/v1/events", json=body))[0]

    async def publish_many(self, events: Iterable[Mapping[str, Any]]) -> List[Published]:
        """Publish a batch: each item has the keys of :meth:`publish`'s
        arguments (``user_id`` or ``stream``, exactly one)."""
        batch = _batch(events)
        body = await self._request("POST", "/api/v1/events", json={"events": batch})
        return _published(body)

    async def unsubscribe(self, stream: str, user_id: str) -> int:
        """Remove ``user_id`` from the shared ``stream`` on every node (see
        :meth:`Herald.unsubscribe`); returns how many subscriptions ended."""
        body = await self._request(
            "POST", "/api/v1/streams/unsubscribe", json={"stream": stream, "user_id": user_id}
        )
        return int(body["removed"])

    async def presence(self, stream: str, limit: Optional[int] = None) -> Presence:
        """Who is in the shared ``stream`` (see :meth:`Herald.presence`)."""
        body = await self._request(
            "GET", "/api/v1/streams/presence", params=_presence_params(stream, limit)
        )
        return _presence(body)

    async def disconnect(self, user_id: str) -> int:
        """Close every connection of ``user_id`` (4409); returns how many."""
        body = await self._request("POST", "/api/v1/disconnect", json={"user_id": user_id})
        return int(body["disconnected"])

    async def connections(self, user_id: Optional[str] = None) -> List[Dict[str, Any]]:
        """Describe live connections, of one user or all."""
        params = {"user_id": user_id} if user_id is not None else None
        body = await self._request("GET", "/api/v1/connections", params=params)
        return list(body["connections"])

    def run(
        self,
        user: Optional[Target] = None,
        *,
        thread_id: Optional[str] = None,
        run_id: Optional[str] = None,
        started: Optional[bool] = None,
        stream: Optional[str] = None,
    ) -> AsyncRun:
        """An agent run, as an async context manager that is never left open
        (the arguments as for :meth:`Herald.run`)."""
        return AsyncRun(self, *_target(user, thread_id, run_id, started, stream))
