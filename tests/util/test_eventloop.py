"""The one event loop (pystratovirt.util.eventloop): descriptors, timers and work handed over
from other threads, on the calling thread (the control loop) or a thread of its own (a device's
I/O thread). Real eventfds and threads; no KVM needed."""

from __future__ import annotations

import os
import threading
import time

import pytest

from pystratovirt.util.eventloop import EPOLLIN, EventLoop

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def thread_loop():
    loop = EventLoop("test-io")
    yield loop
    loop.stop(5)
    loop.close()


def wait(event: threading.Event) -> None:
    assert event.wait(5), "the loop did not run the callback"


def test_descriptor_callbacks_run_on_the_loop_thread_with_the_mask(thread_loop):
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    seen = []
    done = threading.Event()

    def on_ready(mask):
        os.eventfd_read(efd)  # the callback drains; the loop never reads a descriptor itself
        seen.append((mask, threading.current_thread().name))
        done.set()
    thread_loop.register(efd, EPOLLIN, on_ready)
    thread_loop.start()
    os.eventfd_write(efd, 1)
    wait(done)
    assert seen == [(EPOLLIN, "test-io")]
    assert thread_loop.is_registered(efd)
    thread_loop.unregister(efd)
    assert not thread_loop.is_registered(efd)
    thread_loop.unregister(efd)  # unknown descriptors are ignored
    os.close(efd)


def test_call_soon_threadsafe_and_timers_in_order(thread_loop):
    order = []
    done = threading.Event()
    thread_loop.start()
    thread_loop.call_later(0.2, lambda: (order.append("late"), done.set()))
    thread_loop.call_later(0.05, lambda: order.append("early"))
    cancelled = thread_loop.call_later(0.1, lambda: order.append("cancelled"))
    cancelled.cancel()
    thread_loop.call_soon_threadsafe(lambda: order.append("soon"))
    wait(done)
    assert order == ["soon", "early", "late"]


def test_a_timer_set_from_another_thread_wakes_a_sleeping_loop(thread_loop):
    thread_loop.start()
    time.sleep(0.1)  # the loop sleeps with no timer at all
    fired = threading.Event()
    start = time.monotonic()
    thread_loop.call_later(0.05, fired.set)
    wait(fired)
    assert time.monotonic() - start < 2


def test_a_failing_callback_is_logged_and_the_loop_goes_on(thread_loop, caplog):
    ok = threading.Event()
    thread_loop.start()
    thread_loop.call_soon_threadsafe(lambda: 1 / 0)
    thread_loop.call_soon_threadsafe(ok.set)
    wait(ok)
    assert "event loop callback failed" in caplog.text


def test_on_start_runs_first_on_the_new_thread(thread_loop):
    names = []
    ready = threading.Event()
    thread_loop.start(on_start=lambda: names.append(threading.current_thread().name))
    thread_loop.call_soon_threadsafe(ready.set)
    wait(ready)
    assert names == ["test-io"]
    with pytest.raises(RuntimeError):
        thread_loop.start()


def test_stop_joins_the_thread_after_the_callback_in_progress(thread_loop):
    finished = threading.Event()
    entered = threading.Event()

    def slow():
        entered.set()
        time.sleep(0.2)
        finished.set()
    thread_loop.start()
    thread_loop.call_soon_threadsafe(slow)
    wait(entered)
    assert thread_loop.stop(5)
    assert finished.is_set() and not thread_loop.running


def test_stop_before_the_thread_runs_still_ends_it():
    loop = EventLoop("quick")
    loop.start()
    assert loop.stop(5)
    assert not loop.running
    loop.close()
    loop.close()  # idempotent


def test_run_on_the_calling_thread_until_stop():
    loop = EventLoop()
    ticks = []

    def tick():
        ticks.append(threading.current_thread() is threading.main_thread())
        if len(ticks) == 3:
            loop.stop()
        else:
            loop.call_later(0.01, tick)
    loop.call_later(0, tick)
    loop.run()
    assert ticks == [True, True, True]
    assert loop.in_loop_thread()
    loop.close()
