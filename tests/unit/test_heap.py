"""heap_trimming: glibc's free heap pages go back to the system (RSS falls), on a schedule, and nothing
happens where it is turned off."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import pytest

from router_worker import heap
from router_worker.heap import heap_trimmer, heap_trimming

glibc_only = pytest.mark.skipif(heap_trimmer() is None, reason="glibc's malloc_trim is not available here")

# Frees 150 heap blocks of 512 KiB, each between two live ones (so the heap can not shrink on its own), then
# trims: prints the RSS (MiB) before and after.
_CHILD = textwrap.dedent(
    """
    import ctypes, sys
    from router_worker.heap import heap_trimmer
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
    libc.free(libc.malloc(8 << 20))  # a freed mmapped block raises the mmap threshold: the rest come from the heap
    blocks, pins = [], []
    for _ in range(150):  # each freed block sits between two live ones: nothing merges into the heap's top
        blocks.append(libc.malloc(512 << 10))
        pins.append(libc.malloc(100 << 10))
        ctypes.memset(blocks[-1], 1, 512 << 10)
    for b in blocks:
        libc.free(b)
    before = rss()
    trimmed = heap_trimmer()()
    print(before, rss(), trimmed)
    """
)


@glibc_only
def test_a_trim_gives_the_freed_heap_back() -> None:
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, check=True).stdout
    before, after, trimmed = out.split()
    assert trimmed == "True"
    assert float(before) - float(after) > 50, f"RSS {before} MiB -> {after} MiB"


async def test_trims_on_schedule_and_not_when_off(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def counting() -> bool:
        calls.append(1)
        return True

    monkeypatch.setattr(heap, "heap_trimmer", lambda: counting)
    async with heap_trimming(0) as on:
        await asyncio.sleep(0.05)
    assert (on, calls) == (False, [])
    async with heap_trimming(0.01) as on:
        for _ in range(200):
            await asyncio.sleep(0.01)
            if len(calls) >= 2:
                break
    assert on is True
    assert len(calls) >= 2
    n = len(calls)
    await asyncio.sleep(0.05)
    assert len(calls) == n, "the schedule ends with the block"


def test_no_trimmer_means_nothing_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heap, "heap_trimmer", lambda: None)

    async def main() -> bool:
        async with heap_trimming(1.0) as on:
            return on

    assert asyncio.run(main()) is False


def test_a_trim_more_often_than_once_a_second_is_refused() -> None:
    from router_worker.settings import SettingsError, load_settings

    for ok in (0, 1, 30):
        assert load_settings(heap_trim_s=ok).heap_trim_s == ok
    with pytest.raises(SettingsError, match="ROUTER_HEAP_TRIM_S"):
        load_settings(heap_trim_s=0.001)


async def test_a_failing_trim_is_logged_once_and_the_schedule_ends(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []

    def failing() -> bool:
        calls.append(1)
        raise OSError("no")

    monkeypatch.setattr(heap, "heap_trimmer", lambda: failing)
    async with heap_trimming(0.01):
        for _ in range(100):
            await asyncio.sleep(0.01)
            if calls:
                break
        await asyncio.sleep(0.05)
    assert calls == [1]
    assert "returning free heap memory failed" in caplog.text
