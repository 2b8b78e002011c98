"""Gives borrowed request KV back once the program that read it has finished.

A request KV can be a view of memory a transport lent (``RequestKV.borrowed``:
a CUDA IPC landing region the prefill worker wrote into). The decode engine
inserts it into its page pools with a jitted program, dispatched
asynchronously; the memory may be reused only once that program has
*completed*, not when it was dispatched. Blocking the engine loop on it would
stall decoding for a step, so a small thread waits instead.

What it waits on is a receipt: a tiny output of the reading program. All
outputs of one XLA execution become ready together, when the execution is
done, and unlike the engine state (donated into the next step, hence
deleted) the receipt stays alive for the wait.
"""

from __future__ import annotations

import logging
import queue
import threading

import jax

from pdjax.engine.requests import RequestKV

log = logging.getLogger(__name__)


class BorrowedKvReturns:
  """One waiter thread per engine, started on the first borrowed KV (an
  engine that never sees one has no thread). Returns are in order of the
  programs that read them, which is the order they complete in."""

  def __init__(self):
    self._queue: queue.Queue = queue.Queue()
    self._thread: threading.Thread | None = None
    self._lock = threading.Lock()
    self._pending = 0

  @property
  def pending(self) -> int:
    """Borrowed KVs waiting for their reading program to finish."""
    with self._lock:
      return self._pending

  def after(self, receipt: jax.Array | None, kv: RequestKV) -> None:
    """Gives ``kv`` back once ``receipt`` is ready (at once when None: the
    KV was dropped unread). Nothing to do for KV that is not borrowed."""
    if not kv.borrowed:
      return
    if receipt is None:
      kv.release()
      return
    with self._lock:
      self._pending += 1
      if self._thread is None:
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="borrowed-kv-returns")
        self._thread.start()
    self._queue.put((receipt, kv))

  def wait_idle(self, timeout_s: float = 10.0) -> bool:
    """Until every pending return is done (tests, shutdown)."""
    with self._lock:
      if self._thread is None:
        return True
    done = threading.Event()
    self._queue.put(done)
    return done.wait(timeout_s)

  def close(self) -> None:
    with self._lock:
      thread = self._thread
    if thread is not None:
      self._queue.put(None)
      thread.join(timeout=10)

  def _run(self) -> None:
    while True:
      item = self._queue.get()
      if item is None:
        return
      if isinstance(item, threading.Event):
        item.set()
        continue
      receipt, kv = item
      try:
        receipt.block_until_ready()
      except Exception:  # noqa: BLE001 - the read failed; still nothing reads
        log.exception("the program reading a borrowed KV failed")
      try:
        kv.release()
      except Exception:  # noqa: BLE001
        log.exception("giving a borrowed KV back failed")
      with self._lock:
        self._pending -= 1


__all__ = ["BorrowedKvReturns"]
