"""Agent runs as context managers: opened with ``agent_started``, closed with
exactly one of ``agent_completed``, ``agent_error`` or ``agent_cancelled`` —
whatever happens in the block. ``run.text()`` streams the answer as
``agent_text_delta`` events over one request (see ``_text``); the text is
confirmed before any other event of the run is published, so events keep
their order. Text that cannot be delivered ends the run with ``agent_error``
and raises :class:`TextStreamError` out of the block: never a silent loss.

A run of a :class:`UserMessage` names the message it answers: its
``agent_started`` carries ``{"message_id": <the message's id>}``, so Herald
keeps the question with the run (a client that joins mid-run is replayed the
``user_message`` event, then the run).

A run of a :class:`UserMessage` written to a shared stream (its ``stream``,
e.g. ``"thread:t1"``) publishes every event, and streams its text, into that
stream, where every member sees it; ``herald.run(stream="thread:t1")`` is a
run in a shared stream that answers no message.

A run Herald opened itself (an AI SDK chat turn, :class:`ChatRequest`) is
answered in that run: its id and thread are the request's, and it is not
opened again (no second ``agent_started``)."""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple, Type, Union

from ._errors import HeraldError
from ._text import AsyncTextStream, TextStream
from ._webhook import ChatRequest, UserMessage

if TYPE_CHECKING:
    from ._client import AsyncHerald, Herald

_CANCELLED = (KeyboardInterrupt, asyncio.CancelledError)


#: Whom a run answers: a user id, or the webhook event it answers.
Target = Union[str, UserMessage, ChatRequest]


def _target(
    to: Optional[Target],
    thread_id: Optional[str],
    run_id: Optional[str],
    started: Optional[bool],
    stream: Optional[str] = None,
) -> Tuple[Optional[str], Optional[str], Optional[str], bool, Optional[str], Optional[str]]:
    """The user, thread and run ids of a run, whether Herald opened it
    already, the id of the message it answers (a :class:`UserMessage`'s,
    else ``None``) and the shared stream it runs in (else ``None``: the
    user's own stream), from :meth:`Herald.run`'s arguments."""
    if isinstance(to, ChatRequest):
        if thread_id is not None or run_id is not None or stream is not None:
            raise TypeError(
                "a run answering a ChatRequest uses its run_id and chat_id, in the user's stream: "
                "do not pass thread_id, run_id or stream"
            )
        # Herald opened the run (and published its agent_started).
        return to.user_id, to.chat_id, to.run_id, True if started is None else started, None, None
    if isinstance(to, UserMessage):
        if thread_id is not None or stream is not None:
            raise TypeError(
                "a run answering a UserMessage uses its thread_id and stream: do not pass them"
            )
        # Its agent_started names the message, so Herald keeps the question
        # with the run; a message written to a shared stream is answered there.
        return to.user_id, to.thread_id, run_id, bool(started), to.message_id, to.stream
    if to is None:
        if stream is None:
            raise TypeError("a run needs a user id, a UserMessage, a ChatRequest or a stream")
        return None, thread_id, run_id, bool(started), None, stream
    if not isinstance(to, str):
        raise TypeError(
            f"a run's user is a user id, a UserMessage or a ChatRequest, not {type(to).__name__}"
        )
    if stream is not None:
        raise TypeError("a run goes to a user or to a shared stream: give exactly one, not both")
    return to, thread_id, run_id, bool(started), None, None


def _owner(user_id: Optional[str], stream: Optional[str]) -> Optional[str]:
    """The user whose own stream a run publishes to: none when it runs in a
    shared stream (then the user, if any, is the message's sender)."""
    return None if stream is not None else user_id


def _opening(message_id: Optional[str]) -> Dict[str, Any]:
    """The data of a run's ``agent_started``: the message it answers, if any."""
    return {} if message_id is None else {"message_id": message_id}


def _closing(
    exc_type: Optional[Type[BaseException]], exc: Optional[BaseException], final: Any
) -> "tuple[str, Dict[str, Any]]":
    """The event that closes a run, for how its block ended."""
    if exc_type is None:
        data: Dict[str, Any] = {}
        if final is not None:
            data["final_response"] = final
        return "agent_completed", data
    if issubclass(exc_type, _CANCELLED):
        return "agent_cancelled", {"reason": exc_type.__name__}
    return "agent_error", {"error": exc_type.__name__, "message": str(exc)}


def _tool_done(
    call: "ToolCall | AsyncToolCall",
    exc_type: Optional[Type[BaseException]],
    exc: Optional[BaseException],
) -> Dict[str, Any]:
    done: Dict[str, Any] = {"tool": call.name, "tool_call_id": call.id}
    if exc_type is None:
        done["output"] = call.result
    else:
        done["error"] = {"type": exc_type.__name__, "message": str(exc)}
    return done


def _call_id(given: Optional[str]) -> str:
    return given or f"call_{uuid.uuid4().hex[:16]}"


class ToolCall:
    """One tool call inside a run: ``tool_executing`` on entry, ``tool_completed``
    on exit with :attr:`result` (or the error, when the block raised)."""

    def __init__(self, run: "Run", name: str, args: Any, call_id: Optional[str]) -> None:
        self._run, self.name, self.args = run, name, args
        #: The call's id, sent as ``tool_call_id`` on both events (generated when not given).
        self.id = _call_id(call_id)
        #: Set this to the tool's output before the block ends.
        self.result: Any = None

    def __enter__(self) -> "ToolCall":
        try:
            self._run._emit(
                "tool_executing", {"tool": self.name, "tool_call_id": self.id, "input": self.args}
            )
        except _CANCELLED as e:
            self.__exit__(type(e), e, e.__traceback__)
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._run._emit("tool_completed", _tool_done(self, exc_type, exc))


class Run:
    """A blocking agent run (see :meth:`Herald.run`)."""

    def __init__(
        self,
        client: "Herald",
        user_id: Optional[str],
        thread_id: Optional[str],
        run_id: Optional[str],
        started: bool = False,
        message_id: Optional[str] = None,
        stream: Optional[str] = None,
    ) -> None:
        #: The user the run answers (for a run of a shared stream's message,
        #: its sender; ``None`` for ``run(stream=…)``).
        self.user_id = user_id
        self._client, self.thread_id = client, thread_id
        #: The shared stream the run publishes to, or ``None``: the user's own.
        self.stream = stream
        #: The run's id (generated when not given).
        self.run_id = run_id or f"run_{uuid.uuid4().hex[:16]}"
        #: Whether Herald opened the run already (then entering it publishes nothing).
        self.started = started
        #: The id of the user message the run answers (a :class:`UserMessage`'s),
        #: sent as ``message_id`` in its ``agent_started``; ``None`` otherwise.
        self.message_id = message_id
        self._final: Any = None
        self._text = TextStream(client, _owner(user_id, stream), self.run_id, thread_id, stream)

    def _emit(self, event: str, data: Dict[str, Any]) -> None:
        self._text.flush()
        self._client.publish(
            _owner(self.user_id, self.stream),
            event,
            data=data,
            thread_id=self.thread_id,
            run_id=self.run_id,
            stream=self.stream,
        )

    def text(self, delta: str, part: str = "answer") -> None:
        """Append ``delta`` to the run's text ``part`` (``agent_text_delta``):
        queued and sent at once over the run's text stream, without waiting.
        Raises :class:`TextStreamError` if an earlier delta could not be
        delivered; so does the run's end (after publishing ``agent_error``),
        and any event the run publishes after it."""
        self._text.text(delta, part)

    def __enter__(self) -> "Run":
        if self.started:
            return self
        try:
            self._emit("agent_started", _opening(self.message_id))
        except _CANCELLED as e:
            # Interrupted with the opening event in flight: Herald may have
            # delivered it, so the run still gets its closing event.
            self.__exit__(type(e), e, e.__traceback__)
            raise
        return self

    def thinking(self, text: str) -> None:
        """Publish ``agent_thinking`` with ``text``."""
        self._emit("agent_thinking", {"text": text})

    def tool(self, name: str, args: Any = None, call_id: Optional[str] = None) -> ToolCall:
        """A tool call, as a context manager; ``call_id`` pairs its two events
        (generated when not given)."""
        return ToolCall(self, name, args, call_id)

    def complete(self, final_response: Any) -> None:
        """Set the final answer sent with ``agent_completed``."""
        self._final = final_response

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        failed: Optional[HeraldError] = None
        try:
            self._text.flush()
        except HeraldError as e:
            if exc_type is None:
                exc_type, exc, failed = type(e), e, e
        event, data = _closing(exc_type, exc, self._final)
        self._emit(event, data)
        if failed is not None:
            # The text did not go out: the run ended with agent_error, and
            # the caller must not believe the answer was delivered.
            raise failed


class AsyncToolCall:
    """One tool call inside an async run (see :class:`ToolCall`)."""

    def __init__(self, run: "AsyncRun", name: str, args: Any, call_id: Optional[str]) -> None:
        self._run, self.name, self.args = run, name, args
        #: The call's id, sent as ``tool_call_id`` on both events (generated when not given).
        self.id = _call_id(call_id)
        #: Set this to the tool's output before the block ends.
        self.result: Any = None

    async def __aenter__(self) -> "AsyncToolCall":
        try:
            await self._run._emit(
                "tool_executing", {"tool": self.name, "tool_call_id": self.id, "input": self.args}
            )
        except _CANCELLED as e:
            await self.__aexit__(type(e), e, e.__traceback__)
            raise
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        done = self._run._emit("tool_completed", _tool_done(self, exc_type, exc))
        if exc_type is not None and issubclass(exc_type, _CANCELLED):
            # Shielded: a cancelled call still reports its end.
            await asyncio.shield(done)
        else:
            await done


class AsyncRun:
    """An asyncio agent run (see :meth:`AsyncHerald.run`)."""

    def __init__(
        self,
        client: "AsyncHerald",
        user_id: Optional[str],
        thread_id: Optional[str],
        run_id: Optional[str],
        started: bool = False,
        message_id: Optional[str] = None,
        stream: Optional[str] = None,
    ) -> None:
        #: The user the run answers (for a run of a shared stream's message,
        #: its sender; ``None`` for ``run(stream=…)``).
        self.user_id = user_id
        self._client, self.thread_id = client, thread_id
        #: The shared stream the run publishes to, or ``None``: the user's own.
        self.stream = stream
        #: The run's id (generated when not given).
        self.run_id = run_id or f"run_{uuid.uuid4().hex[:16]}"
        #: Whether Herald opened the run already (then entering it publishes nothing).
        self.started = started
        #: The id of the user message the run answers (a :class:`UserMessage`'s),
        #: sent as ``message_id`` in its ``agent_started``; ``None`` otherwise.
        self.message_id = message_id
        self._final: Any = None
        self._text = AsyncTextStream(client, _owner(user_id, stream), self.run_id, thread_id, stream)

    async def _emit(self, event: str, data: Dict[str, Any]) -> None:
        await self._text.flush()
        await self._client.publish(
            _owner(self.user_id, self.stream),
            event,
            data=data,
            thread_id=self.thread_id,
            run_id=self.run_id,
            stream=self.stream,
        )

    def text(self, delta: str, part: str = "answer") -> None:
        """Append ``delta`` to the run's text ``part`` (see :meth:`Run.text`);
        not a coroutine: it queues, and the run's sender task writes."""
        self._text.text(delta, part)

    async def __aenter__(self) -> "AsyncRun":
        if self.started:
            return self
        try:
            await self._emit("agent_started", _opening(self.message_id))
        except _CANCELLED as e:
            # Cancelled with the opening event in flight: Herald may have
            # delivered it, so the run still gets its closing event.
            await self.__aexit__(type(e), e, e.__traceback__)
            raise
        return self

    async def thinking(self, text: str) -> None:
        """Publish ``agent_thinking`` with ``text``."""
        await self._emit("agent_thinking", {"text": text})

    def tool(
        self, name: str, args: Any = None, call_id: Optional[str] = None
    ) -> AsyncToolCall:
        """A tool call, as an async context manager (see :meth:`Run.tool`)."""
        return AsyncToolCall(self, name, args, call_id)

    def complete(self, final_response: Any) -> None:
        """Set the final answer sent with ``agent_completed``."""
        self._final = final_response

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        failed: Optional[HeraldError] = None
        try:
            await asyncio.shield(self._text.flush())
        except HeraldError as e:
            if exc_type is None:
                exc_type, exc, failed = type(e), e, e
        event, data = _closing(exc_type, exc, self._final)
        # Shielded: a cancelled task still gets its closing event out.
        await asyncio.shield(self._emit(event, data))
        if failed is not None:
            # The text did not go out (see Run.__exit__).
            raise failed
