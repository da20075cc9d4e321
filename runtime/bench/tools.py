"""The trivial tool and the agent the end-to-end benchmark drives."""

from __future__ import annotations

import time
from typing import Any

from ..agent import Agent
from ..tool import tool


@tool(effect="read", name="bench.noop")
def noop(x: int) -> int:
    """Return x (the trivial tool both paths call)."""
    return x


class BenchAgent(Agent):
    """Times its own calls: direct to a plain Ray actor, through the supervisor, or in batches."""

    async def run(self, task: dict[str, Any]) -> dict[str, Any]:
        mode, n, batch = task["mode"], int(task["n"]), int(task.get("batch", 1))
        plain = task.get("plain")
        samples: list[float] = []
        started = time.perf_counter()
        i = 0
        while i < n:
            t = time.perf_counter_ns()
            if mode == "direct":
                await plain.execute.remote(i)
                done = 1
            elif mode == "relay":  # the floor of any design with one more actor hop: a relay that checks nothing
                await task["relay"].call.remote(i)
                done = 1
            elif mode == "supervised":
                await self.call("bench.noop", x=i)
                done = 1
            else:  # "batch": `batch` calls per message, each checked and audited on its own
                k = min(batch, n - i)
                results = await self.call_many([("bench.noop", {"x": i + j}) for j in range(k)])
                if any(isinstance(r, Exception) for r in results):
                    raise RuntimeError(f"batched call failed: {next(r for r in results if isinstance(r, Exception))}")
                done = k
            per_call = (time.perf_counter_ns() - t) / 1000.0 / done
            samples.extend([per_call] * done)
            i += done
        return {"samples_us": samples, "wall_s": time.perf_counter() - started}
