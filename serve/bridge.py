"""The engine's thread and the server's event loop: ``EngineThread`` runs the engine; a ``Group`` is one HTTP
request's sequences (its ``n`` choices), whose events the engine's thread hands to the loop's queue."""

from __future__ import annotations

import asyncio
import itertools
import threading

from .engine import Engine, ErrorEvent, Event, FinishEvent, Request
from .sampling import SamplingParams

_ids = itertools.count()


class EngineThread:
    """Starts and stops the thread that owns the engine."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._stop = threading.Event()
        self._thread = threading.Thread(target=engine.run_forever, args=(self._stop,), name="dmc-engine",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def open(self, prompt_ids: list[int], params: list[SamplingParams]) -> Group:
        """Submit one sequence per choice; their events arrive on the calling event loop."""
        return Group(self.engine, prompt_ids, params, asyncio.get_running_loop())


class Group:
    """The sequences of one request. ``events()`` yields (choice index, event) until every choice has finished
    or failed; ``abort()`` drops the unfinished ones (the client went away, a stop string was met)."""

    def __init__(self, engine: Engine, prompt_ids: list[int], params: list[SamplingParams],
                 loop: asyncio.AbstractEventLoop):
        import torch

        self.engine = engine
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.ids = [f"req-{next(_ids)}" for _ in params]
        self.open = set(range(len(params)))
        prompt = torch.tensor(prompt_ids, dtype=torch.long)
        for i, (rid, p) in enumerate(zip(self.ids, params)):
            sink = _sink(loop, self.queue, i)
            engine.submit(Request(rid, prompt, p, sink))

    async def next(self) -> tuple[int, Event]:
        index, event = await self.queue.get()
        if isinstance(event, (FinishEvent, ErrorEvent)):
            self.open.discard(index)
        return index, event

    async def events(self):
        while self.open:
            yield await self.next()

    def abort(self, index: int | None = None) -> None:
        for i in sorted(self.open) if index is None else [index]:
            self.engine.abort(self.ids[i])
            self.open.discard(i)


def _sink(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int):
    def sink(event: Event) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (index, event))
        except RuntimeError:  # the loop has closed (the server is stopping): nobody is listening
            pass
    return sink
