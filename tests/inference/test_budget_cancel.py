"""A request cancelled in the loop iteration its memory is granted is cancelled, and gives the memory back."""

from __future__ import annotations

import asyncio

import pytest

from segsvc.inference.admission import MemoryBudget


@pytest.mark.parametrize("deadline", [False, True], ids=["no-deadline", "deadline"])
def test_a_cancel_that_arrives_with_the_grant_is_not_swallowed(deadline: bool) -> None:
    """Python 3.11's ``wait_for`` returns a result that arrives in the same iteration as the caller's cancel:
    the cancelled request went on to decode and queue, holding its bytes (gh-86296, fixed in 3.12)."""

    async def main() -> tuple[str, int]:
        budget = MemoryBudget(total_bytes=100, max_waiting=4)
        first = await budget.acquire(100)
        loop = asyncio.get_running_loop()
        waiting = asyncio.ensure_future(budget.acquire(60, deadline=loop.time() + 600 if deadline else None))
        while not budget._lines[False]:  # the second request waits for room
            await asyncio.sleep(0)
        first.release()  # grants the waiter: its result is set now...
        waiting.cancel()  # ...and its caller is cancelled in the same iteration
        try:
            held = await waiting
        except asyncio.CancelledError:
            return "cancelled", budget.used_bytes
        held.release()
        return "went on", budget.used_bytes

    assert asyncio.run(main()) == ("cancelled", 0)
