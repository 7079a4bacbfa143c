"""In-flight asyncio work of pclited's services, owned in one place: boots, stops and template builds are started
here, found here by what they work on, and cancelled here at shutdown. Plus `Wakeup`, the pool loop's doorbell, and
`blocking()`, how the services call code that blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine

BOOT, STOP, TEMPLATE = "boot", "stop", "template"  # kinds of work


class Work:
    """Tasks keyed by (kind, subject): at most one boot and one stop per VM id, one build per flavor name. A task
    leaves when it ends; `drain` cancels what is left (pclited's shutdown: the VMMs keep running, detached)."""

    def __init__(self) -> None:
        self._tasks: dict[tuple[str, str], asyncio.Task] = {}

    def start(self, kind: str, subject: str, coro: Coroutine, name: str | None = None) -> asyncio.Task:
        """Run coro as the (kind, subject) work. A previous task of that key is forgotten, not cancelled: the
        caller decides (a template build of a spec nobody wants is cancelled by its manager)."""
        task = asyncio.create_task(coro, name=name)
        key = (kind, subject)
        self._tasks[key] = task

        def done(_task: asyncio.Task) -> None:
            if self._tasks.get(key) is task:
                del self._tasks[key]

        task.add_done_callback(done)
        return task

    def get(self, kind: str, subject: str) -> asyncio.Task | None:
        return self._tasks.get((kind, subject))

    async def drain(self) -> None:
        """Cancel every task and wait for them to end (and for any a cancelled task started meanwhile)."""
        while self._tasks:
            tasks = list(self._tasks.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._tasks = {key: task for key, task in self._tasks.items() if not task.done()}


class Wakeup:
    """Wakes the pool loop early (a claim, a VM gone, a template ready); a delayed wake is coalesced, so a burst of
    claims costs one tick, after it. Call it from the event loop's thread."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._pending = False

    def __call__(self, after_s: float = 0.0) -> None:
        if after_s <= 0:
            self._event.set()
        elif not self._pending:
            self._pending = True
            asyncio.get_running_loop().call_later(after_s, self._delayed)

    def _delayed(self) -> None:
        self._pending = False
        self._event.set()

    async def wait(self, timeout_s: float) -> None:
        """Until woken or timeout_s passed; then armed again."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout_s)
        self._event.clear()


async def blocking(fn, *args, **kwargs):
    """Run fn in a daemon thread: a VMM call stuck in a socket must not hold pclited's exit (to_thread would)."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(ok: bool, value) -> None:
        if not future.done():
            (future.set_result if ok else future.set_exception)(value)

    def run() -> None:
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            loop.call_soon_threadsafe(settle, False, exc)
        else:
            loop.call_soon_threadsafe(settle, True, result)

    threading.Thread(target=run, daemon=True, name=f"pclited-{getattr(fn, '__name__', 'call')}").start()
    return await future
