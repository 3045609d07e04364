"""Client disconnects: a REST request's model work is cancelled when its client goes away (499)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from fastapi import Request

from predictor import metrics

T = TypeVar("T")


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready; its queued work was dropped."""


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Await ``work``, cancelling it (and so dropping its queued model work) if the client goes away."""
    task = asyncio.ensure_future(work)
    try:
        await asyncio.sleep(0)  # let it run its first step: all cache hits finish there, without a watcher
    except asyncio.CancelledError:
        task.cancel()
        raise
    if task.done():
        return task.result()
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        metrics.REJECTED.labels(reason="client_disconnected").inc()
        raise ClientGone()
    return task.result()
