"""A FastAPI agent backend for Herald.

Herald POSTs each user message (and cancel) to ``/herald/webhook``; this app
verifies the signature, answers 200 at once, and runs a fake agent in the
background that streams a run back through Herald's API: thinking, one tool
call, a final answer. A ``cancel`` stops the run, which then ends with
``agent_cancelled``.

Run it (Herald configured with ``HERALD_WEBHOOK_URL=http://127.0.0.1:9000/herald/webhook``
and the same ``HERALD_WEBHOOK_SECRET``)::

    HERALD_URL=http://127.0.0.1:8080 HERALD_API_KEY=... HERALD_WEBHOOK_SECRET=... \\
        uvicorn fastapi_agent:app --port 9000
"""

from __future__ import annotations

import asyncio
import os
from typing import Dict

from fastapi import FastAPI, HTTPException, Request

from herald_gateway import AsyncHerald, Cancel, InvalidSignature, UserMessage, verify_webhook

SECRET = os.environ.get("HERALD_WEBHOOK_SECRET", "")
STEP = float(os.environ.get("AGENT_STEP_SECONDS", "0.3"))

app = FastAPI()
herald = AsyncHerald(
    os.environ.get("HERALD_URL", "http://127.0.0.1:8080"), os.environ.get("HERALD_API_KEY", "")
)
runs: Dict[str, "asyncio.Task[None]"] = {}


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


@app.post("/herald/webhook")
async def webhook(request: Request) -> Dict[str, bool]:
    """Verify, then start or cancel a run, and answer at once."""
    body = await request.body()
    try:
        event = verify_webhook(SECRET, request.headers, body)
    except InvalidSignature as e:
        raise HTTPException(status_code=401, detail=str(e)) from e
    if isinstance(event, UserMessage):
        run_id = f"run_{event.message_id}"
        if run_id not in runs:
            task = asyncio.create_task(agent(event, run_id))
            runs[run_id] = task
            task.add_done_callback(lambda _: runs.pop(run_id, None))
    elif isinstance(event, Cancel):
        task = runs.get(event.run_id)
        if task is not None:
            task.cancel()
    return {"ok": True}
