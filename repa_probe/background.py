"""Work beside the main thread: loading the next batch while this one computes, and writing finished results
while the next one computes. Errors of the helper threads are raised in the caller's thread; closing waits
for the helper, so nothing it holds (a claimed batch, a chunk half written) outlives the call that made it."""
from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, TypeVar

if TYPE_CHECKING:
    import numpy as np
    import torch

T = TypeVar("T")
_END = object()


class Prefetcher(Iterator[T]):
    """Iterates `iterable` on a background thread, up to `depth` items ahead of the consumer.

    An exception raised by the iterable is raised by `next()` at its place in the sequence. Use it as a
    context manager (or call `close()`): leaving early stops the thread and waits for it."""

    def __init__(self, iterable: Iterable[T], depth: int = 1):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iter(iterable),), daemon=True, name="prefetch")
        self._thread.start()

    def _run(self, it: Iterator[T]) -> None:
        while not self._stop.is_set():
            try:
                item = (next(it), None)
            except StopIteration:
                item = (_END, None)
            except BaseException as e:   # handed to the consumer
                item = (_END, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.05)
                    break
                except queue.Full:
                    continue
            if item[0] is _END:
                return

    def __next__(self) -> T:
        item, error = self._queue.get()
        if error is not None:
            self.close()
            raise error
        if item is _END:
            self.close()
            raise StopIteration
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> "Prefetcher[T]":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Writer:
    """Runs submitted jobs in order on one background thread, at most `depth` waiting (the producer blocks
    beyond that, which bounds the memory held by results not yet written).

    After a job fails, later jobs are skipped, and the error is raised in the caller's thread by the next
    `submit` or by `finish`. `finish()` waits until every submitted job has run (or been skipped)."""

    def __init__(self, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="writer")
        self._thread.start()

    def _run(self) -> None:
        while (job := self._queue.get()) is not _END:
            if self._error is None:
                try:
                    job()
                except BaseException as e:    # raised in the caller's thread
                    self._error = e

    def submit(self, job: Callable[[], object]) -> None:
        self._raise()
        if not self._thread.is_alive():
            raise RuntimeError("Writer.submit after finish")
        self._queue.put(job)

    def finish(self, raise_error: bool = True) -> None:
        """Wait for every submitted job; then raise the first job's error if `raise_error`. Idempotent."""
        if self._thread.is_alive():
            self._queue.put(_END)
            self._thread.join()
        if raise_error:
            self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error


def host_copy(tensors: dict[str, "torch.Tensor"]) -> Callable[[], dict[str, "np.ndarray"]]:
    """Start copying tensors to host memory (on CUDA: into pinned memory, asynchronously, behind the work
    already queued); → a function that waits for the copies and returns numpy arrays (made to be called on
    a writer thread while the device runs the next batch). CPU tensors are returned as they are."""
    import torch
    if not any(t.device.type == "cuda" for t in tensors.values()):
        return lambda: {k: v.cpu().numpy() for k, v in tensors.items()}
    host = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True).copy_(v, non_blocking=True)
            for k, v in tensors.items()}
    copied = torch.cuda.Event()
    copied.record()

    def wait() -> dict[str, "np.ndarray"]:
        copied.synchronize()
        return {k: v.numpy() for k, v in host.items()}
    return wait
