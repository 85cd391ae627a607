"""A FastAPI agent backend for Herald.

Herald POSTs each user message, AI SDK chat turn (``chat_request``, from
``useChat`` on Herald's ``GET /ai``) and cancel to ``/herald/webhook``; this
app verifies the signature, answers 200 at once, and runs a fake agent in the
background that streams a run back through Herald's API: thinking, one tool
call, a final answer (for a chat turn also streamed as text, which is what
``useChat`` shows), in the run Herald opened for a chat turn. A ``cancel``
stops the run, which then ends with ``agent_cancelled``. A delivery is acted
on once (deduplicated by its ``X-Herald-Delivery`` id); a user message is
answered once per user and message id, a chat turn once per run id. A
message written to a shared stream (``thread:t1``) is answered in that
stream, and any member's ``cancel`` (one who may write to it) stops its run.
With ``HERALD_SUBSCRIBE_PROXY=true``, a subscribe to a stream the token does
not grant is asked here (``subscribe_request``): any ``room:*`` is open to
read and write, every other stream is refused.

Run it (Herald configured with ``HERALD_WEBHOOK_URL=http://127.0.0.1:9000/herald/webhook``
and the same ``HERALD_WEBHOOK_SECRET``)::

    HERALD_URL=http://127.0.0.1:8080 HERALD_API_KEY=... HERALD_WEBHOOK_SECRET=... \\
        uvicorn fastapi_agent:app --port 9000
"""

from __future__ import annotations

import asyncio
import os
import re
import time
import uuid
from collections import OrderedDict
from typing import Dict, Tuple, Union

from fastapi import FastAPI, HTTPException, Request

from herald_gateway import (
    AsyncHerald,
    Cancel,
    ChatRequest,
    InvalidSignature,
    SubscribeRequest,
    UserMessage,
    verify_webhook,
)

SECRET = os.environ.get("HERALD_WEBHOOK_SECRET", "")
STEP = float(os.environ.get("AGENT_STEP_SECONDS", "0.3"))
#: verify_webhook's window: a delivery older (or newer) than this does not verify.
TOLERANCE = 300

app = FastAPI()
herald = AsyncHerald(
    os.environ.get("HERALD_URL", "http://127.0.0.1:8080"), os.environ.get("HERALD_API_KEY", "")
)


class SeenDeliveries:
    """Delivery ids acted on recently, so a retried or replayed delivery
    (the same ``X-Herald-Delivery``) is acted on once. Bounded: an id is
    forgotten after ``ttl`` seconds — by then its signed timestamp is outside
    verify_webhook's window, so a replay fails verification — or, under a
    flood, when more than ``size`` newer ids came in."""

    def __init__(self, size: int = 65_536, ttl: float = 2 * TOLERANCE) -> None:
        self.size, self.ttl = size, ttl
        self._ids: "OrderedDict[str, float]" = OrderedDict()

    def first_time(self, delivery_id: str) -> bool:
        """Record ``delivery_id``; whether it is new."""
        now = time.monotonic()
        while self._ids and next(iter(self._ids.values())) < now - self.ttl:
            self._ids.popitem(last=False)
        if delivery_id in self._ids:
            return False
        self._ids[delivery_id] = now
        while len(self._ids) > self.size:
            self._ids.popitem(last=False)
        return True


deliveries = SeenDeliveries()
#: Runs in flight, by (owner, run_id), for cancels.
runs: Dict[Tuple[str, str], "asyncio.Task[None]"] = {}
#: The runs answering user messages, by (owner, message_id): message ids
#: are the user's own (or a shared stream's), so two users may well send
#: the same one.
by_message: Dict[Tuple[str, str], str] = {}


def owner(event: Union[UserMessage, ChatRequest, Cancel]) -> str:
    """Whose runs these are: a shared stream's (``thread:t1``; any member
    who may write to it may cancel them), else the user's (``user:<id>``,
    which no shared stream's name can be)."""
    stream = getattr(event, "stream", None)  # a ChatRequest is always the user's
    return stream if stream is not None else f"user:{event.user_id}"


async def agent(event: Union[UserMessage, ChatRequest], run_id: str) -> None:
    """The fake agent: one streamed run per message or chat turn."""
    # A ChatRequest's run is Herald's (its run_id, thread = the chat id, and
    # agent_started already published); a UserMessage's is ours.
    run = herald.run(event) if isinstance(event, ChatRequest) else herald.run(event, run_id=run_id)
    async with run:
        await run.thinking(f"Reading: {event.text}")
        await asyncio.sleep(STEP)
        async with run.tool("search", {"query": event.text}) as call:
            await asyncio.sleep(STEP)
            call.result = {"hits": 3}
        await run.thinking("Writing the answer")
        await asyncio.sleep(STEP)
        answer = f"You said: {event.text}"
        if isinstance(event, ChatRequest):
            # useChat shows the run's text (agent_text_delta), word by word.
            for word in re.findall(r"\S+\s*", answer):
                run.text(word)
                await asyncio.sleep(STEP / 10)
        run.complete(answer)


def start(event: Union[UserMessage, ChatRequest]) -> None:
    message = None
    if isinstance(event, ChatRequest):
        run_id = event.run_id
    else:
        message = (owner(event), event.message_id)
        if message in by_message:
            return
        run_id = f"run_{uuid.uuid4().hex}"
    key = (owner(event), run_id)
    if key in runs:
        return
    task = asyncio.create_task(agent(event, run_id))
    runs[key] = task
    if message is not None:
        by_message[message] = run_id

    def done(_: "asyncio.Task[None]") -> None:
        runs.pop(key, None)
        if message is not None:
            by_message.pop(message, None)

    task.add_done_callback(done)


@app.post("/herald/webhook")
async def webhook(request: Request) -> Dict[str, bool]:
    """Verify, then start or cancel a run (once per delivery), and answer at
    once; a subscribe request is answered allow or deny (every time: a
    retry must get the answer too)."""
    body = await request.body()
    try:
        event = verify_webhook(SECRET, request.headers, body, tolerance=TOLERANCE)
    except InvalidSignature as e:
        raise HTTPException(status_code=401, detail=str(e)) from e
    if isinstance(event, SubscribeRequest):
        if event.stream.startswith("room:"):
            return event.allow(write=True)
        return event.deny()
    if event.delivery_id is not None and not deliveries.first_time(event.delivery_id):
        return {"ok": True}  # acted on already: a retry or a replay
    if isinstance(event, (UserMessage, ChatRequest)):
        start(event)
    elif isinstance(event, Cancel):
        task = runs.get((owner(event), event.run_id))
        if task is not None:
            task.cancel()
    return {"ok": True}
