"""hardware.in_fresh_thread(_async): work run in a thread that ends with it, results and errors carried back."""

import asyncio
import threading

import pytest

from slmkit.hardware import in_fresh_thread, in_fresh_thread_async


def test_in_fresh_thread_returns_raises_and_leaves_no_thread_behind():
    before = threading.active_count()
    assert in_fresh_thread(lambda a, b=0: (threading.current_thread().name, a + b), 2, b=3)[1] == 5
    assert in_fresh_thread(threading.current_thread) is not threading.main_thread()
    with pytest.raises(SystemExit, match="error: x"):
        in_fresh_thread(lambda: (_ for _ in ()).throw(SystemExit("error: x")))
    assert threading.active_count() == before  # each worker ended with its work


def test_in_fresh_thread_async_awaits_a_new_thread_and_survives_a_cancelled_waiter():
    def slow(x):
        threading.Event().wait(0.2)
        return x * 2

    async def main():
        assert await in_fresh_thread_async(lambda: 21 * 2) == 42
        with pytest.raises(ValueError, match="bad"):
            await in_fresh_thread_async(lambda: int("bad"))
        task = asyncio.create_task(in_fresh_thread_async(slow, 1))
        await asyncio.sleep(0.05)
        task.cancel()  # the client went away: the result arriving later must not break the loop
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.3)
        return await in_fresh_thread_async(slow, 4)

    assert asyncio.run(main()) == 8
