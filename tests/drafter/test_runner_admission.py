"""Bounded concurrency per device: slots, a bounded FIFO wait, refusal with Retry-After, drain."""

import asyncio

import pytest
from sled_drafter.admission import Admission
from sled_drafter.errors import Overloaded, Unavailable


async def test_slots_then_fifo_waiters_then_refusal():
    adm = Admission(max_active=2, max_waiting=2, wait_s=5.0)
    await adm.acquire()
    await adm.acquire()
    order = []

    async def wait(name):
        await adm.acquire()
        order.append(name)

    first = asyncio.create_task(wait("first"))
    await asyncio.sleep(0)
    second = asyncio.create_task(wait("second"))
    await asyncio.sleep(0)
    assert adm.waiting == 2
    with pytest.raises(Overloaded) as info:
        await adm.acquire()
    assert info.value.status == 429 and info.value.retry_after_s > 0
    adm.release()
    await first
    adm.release()
    await second
    assert order == ["first", "second"] and adm.active == 2 and adm.waiting == 0


async def test_a_waiter_times_out_and_its_turn_passes_on():
    adm = Admission(max_active=1, max_waiting=4, wait_s=0.05)
    await adm.acquire()
    with pytest.raises(Overloaded):
        await adm.acquire()
    assert adm.waiting == 0
    adm.release()
    assert adm.active == 0
    await adm.acquire()
    assert adm.active == 1


async def test_a_cancelled_waiter_gives_back_a_handed_over_slot():
    adm = Admission(max_active=1, max_waiting=4, wait_s=5.0)
    await adm.acquire()
    waiter = asyncio.create_task(adm.acquire())
    await asyncio.sleep(0)
    adm.release()  # hands the slot to the waiter...
    waiter.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert adm.active == 0
    await asyncio.wait_for(adm.acquire(), 1.0)


async def test_drain_refuses_new_work_and_waits_for_running():
    adm = Admission(max_active=1, max_waiting=4, wait_s=5.0)
    await adm.acquire()
    waiter = asyncio.create_task(adm.acquire())
    await asyncio.sleep(0)
    drained = asyncio.create_task(adm.drain(5.0))
    with pytest.raises(Unavailable):
        await waiter
    with pytest.raises(Unavailable) as info:
        await adm.acquire()
    assert info.value.status == 503
    assert not drained.done()
    adm.release()
    assert await drained is True


async def test_drain_times_out_with_work_running():
    adm = Admission(max_active=1, max_waiting=0, wait_s=1.0)
    await adm.acquire()
    assert await adm.drain(0.05) is False
