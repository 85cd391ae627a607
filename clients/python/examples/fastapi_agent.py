"""A FastAPI agent backend for Herald.

Herald POSTs each user message (and cancel) to ``/herald/webhook``; this app
verifies the signature, answers 200 at once, and runs a fake agent in the
background that streams a run back through Herald's API: thinking, one tool
call, a final answer. A ``cancel`` stops the run, which then ends with
``agent_cancelled``. A delivery is acted on once (deduplicated by its
``X-Herald-Delivery`` id), and runs are told apart by user and message id.

Run it (Herald configured with ``HERALD_WEBHOOK_URL=http://127.0.0.1:9000/herald/webhook``
and the same ``HERALD_WEBHOOK_SECRET``)::

    HERALD_URL=http://127.0.0.1:8080 HERALD_API_KEY=... HERALD_WEBHOOK_SECRET=... \\
        uvicorn fastapi_agent:app --port 9000
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections import OrderedDict
from typing import Dict, Tuple

from fastapi import FastAPI, HTTPException, Request

from herald_gateway import AsyncHerald, Cancel, InvalidSignature, UserMessage, verify_webhook

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
#: Runs in flight, by (user_id, message_id): message ids are the user's own,
#: so two users may well send the same one.
runs: Dict[Tuple[str, str], "asyncio.Task[None]"] = {}
#: The same runs by (user_id, run_id), for cancels.
by_run_id: Dict[Tuple[str, str], Tuple[str, str]] = {}


async def agent(msg: UserMessage, run_id: str) -> None:
    """The fake agent: one streamed run per message."""
    async with herald.run(msg.user_id, thread_id=msg.thread_id, run_id=run_id) as run:
        await run.thinking(f"Reading: {msg.text}")
        await asyncio.sleep(STEP)
        async with run.tool("search", {"query": msg.text}) as call:
            await asyncio.sleep(STEP)
            call.result = {"hits": 3}
        await run.thinking("Writing the answer")
        await asyncio.sleep(STEP)
        run.complete(f"You said: {msg.text}")


def start(msg: UserMessage) -> None:
    key = (msg.user_id, msg.message_id)
    if key in runs:
        return
    run_id = f"run_{uuid.uuid4().hex}"
    task = asyncio.create_task(agent(msg, run_id))
    runs[key] = task
    by_run_id[(msg.user_id, run_id)] = key

    def done(_: "asyncio.Task[None]") -> None:
        runs.pop(key, None)
        by_run_id.pop((msg.user_id, run_id), None)

    task.add_done_callback(done)


@app.post("/herald/webhook")
async def webhook(request: Request) -> Dict[str, bool]:
    """Verify, then start or cancel a run (once per delivery), and answer at once."""
    body = await request.body()
    try:
        event = verify_webhook(SECRET, request.headers, body, tolerance=TOLERANCE)
    except InvalidSignature as e:
        raise HTTPException(status_code=401, detail=str(e)) from e
    if event.delivery_id is not None and not deliveries.first_time(event.delivery_id):
        return {"ok": True}  # acted on already: a retry or a replay
    if isinstance(event, UserMessage):
        start(event)
    elif isinstance(event, Cancel):
        key = by_run_id.get((event.user_id, event.run_id))
        task = runs.get(key) if key is not None else None
        if task is not None:
            task.cancel()
    return {"ok": True}
