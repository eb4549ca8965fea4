"""POSTs alerts to `alerts.webhook`: from a bounded queue, in the background, each retried a few times.

A request never waits on the webhook; when the queue is full or the receiver keeps failing, the alert is
still in the audit log and the metric, and the loss is counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import aiohttp

log = logging.getLogger("agent.alerts")


class WebhookSender:
    def __init__(self, url: str, timeout_s: float = 2.0, max_queue: int = 1000, retries: int = 3) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.retries = retries
        self.sent = 0
        self.failed = 0
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(max_queue)
        self._task: asyncio.Task[None] | None = None

    def submit(self, alert: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait(alert)
        except asyncio.QueueFull:
            self.failed += 1
        if self._task is None:
            # Without a running loop (a synchronous caller) it starts with the next alert.
            with contextlib.suppress(RuntimeError):
                self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as http:
            while True:
                alert = await self._queue.get()
                for attempt in range(self.retries):
                    try:
                        async with http.post(self.url, json=alert, allow_redirects=False) as resp:
                            if resp.status < 300:
                                self.sent += 1
                                break
                            why = f"HTTP {resp.status}"
                    except (aiohttp.ClientError, TimeoutError) as e:
                        why = type(e).__name__
                    await asyncio.sleep(0.5 * 2**attempt)
                else:
                    self.failed += 1
                    log.error("alert %s not delivered to the webhook (%s)", alert.get("alert"), why)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
