"""A streaming pipeline over many images: parallel decoding, batched inference on the calling
thread, rendering/encoding/writing on worker threads, bounded queues everywhere.

    files -> [readers: decode] -> batches -> [streams: resize, forward, CAMs, boxes]
          -> [writers: overlay, encode, atomic write] -> documents, in input order

At most ``window`` items wait at each stage, so memory stays flat however many images there
are; and a ``MemoryBudget`` admits images by what their headers say they will cost, so it stays
bounded whatever size the images are. Decoding (libjpeg/zlib), resizing, ONNX Runtime and PNG encoding release the GIL, so
threads run them in parallel. With the ONNX backend two *streams* (inference threads, each
with half of the cores for ONNX Runtime) explain alternate batches: while one runs its forward
pass, the other resizes its inputs and turns its features into CAMs and boxes, work that would
otherwise leave cores idle between forward passes (measured in benchmarks/bench_speed.py).
``workers=0`` runs everything on the calling thread (the plain sequential loop).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from typing import Any, TypeVar

from gapcam.errors import GapcamError

T = TypeVar("T")
R = TypeVar("R")

#: glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
#: freed memory kept by the allocator before it is returned to the OS (bounded by the peak)
KEEP_FREED_BYTES = 1 << 30


#: Bytes that images in flight (decoded, mapped, drawn) may take at once, by default: a setting
#: (``gapcam localize --memory-budget``), never derived from the inputs (docs/speed.md, "Memory").
DEFAULT_MEMORY_BUDGET = 2 << 30


class MemoryBudget:
    """Bytes promised to the images in flight, against ``capacity``. An image is admitted when
    it ``fits``: when the images before it leave room for it, or when nothing else is in
    flight (so one image larger than the whole budget still runs, alone). Used by one thread,
    the one that schedules the pipeline; ``peak`` is the most promised at once."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise GapcamError(f"memory_budget={capacity!r}: give a positive number of bytes")
        self.capacity = capacity
        self.used = 0
        self.peak = 0

    def fits(self, cost: int) -> bool:
        return self.used == 0 or self.used + cost <= self.capacity

    def take(self, cost: int) -> None:
        self.used += cost
        self.peak = max(self.peak, self.used)

    def release(self, cost: int) -> None:
        self.used -= cost


def default_workers() -> int:
    """Reader and writer threads each: the core count, between 2 and 16."""
    return max(2, min(16, os.cpu_count() or 2))


def default_batch_size() -> int:
    """Images per forward pass: 8 on a laptop, 16 on a server (more only adds latency)."""
    return 16 if (os.cpu_count() or 2) >= 16 else 8


class InlineExecutor(Executor):
    """Runs each task at once on the calling thread (``workers=0``)."""

    def submit(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> Future[R]:
        future: Future[R] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future


def executor(workers: int, stack: ExitStack, name: str) -> Executor:
    if workers <= 0:
        return InlineExecutor()
    return stack.enter_context(ThreadPoolExecutor(workers, thread_name_prefix=f"gapcam-{name}"))


def outcome(future: Future[Any]) -> Any:
    """The future's result, or its ``GapcamError`` (other exceptions propagate): R | GapcamError."""
    try:
        return future.result()
    except GapcamError as exc:
        return exc


def ordered_map(
    fn: Callable[[T], R], items: Iterable[T], pool: Executor, window: int
) -> Iterator[tuple[T, R | GapcamError]]:
    """``(item, fn(item) or its GapcamError)`` in input order, at most ``window`` in flight."""
    pending: deque[tuple[T, Future[R]]] = deque()
    for item in items:
        pending.append((item, pool.submit(fn, item)))
        if len(pending) >= max(1, window):
            first, future = pending.popleft()
            yield first, outcome(future)
    while pending:
        first, future = pending.popleft()
        yield first, outcome(future)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to ``count`` inside the block, then restored.

    The pipeline runs it with 1 when its streams run the forward passes in ONNX Runtime's own
    threads: torch then only does the small per-image work (logits, CAMs, upsampling,
    normalising), which the streams already run side by side. Split over torch's threads as
    well, each of those small steps waited for helper threads that the other stream's forward
    pass kept off the cores (measured in docs/speed.md)."""
    import torch

    before = torch.get_num_threads()
    if count == before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tune_allocator() -> bool:
    """Ask glibc malloc to keep freed memory instead of returning it to the OS.

    Large activations are freed and allocated again on every batch; by default glibc unmaps
    them and the next batch page-faults them back in (the cost is measured in docs/speed.md
    and README's benchmark table: "forward eager, malloc kept"). Memory stays bounded by the
    pipeline's peak. Skipped unless on glibc, and when the user set ``GLIBC_TUNABLES`` or
    ``GAPCAM_MALLOC=system``. True when applied.
    """
    if (
        not sys.platform.startswith("linux")
        or "GLIBC_TUNABLES" in os.environ
        or os.environ.get("GAPCAM_MALLOC") == "system"
    ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES))
