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
  programs that read them, which is the order they complete in.

  ``close`` (engine shutdown) ends the thread once everything queued to it
  is back; a borrowed KV that arrives later starts a fresh one, so an engine
  stays usable after a close (tests share engines)."""

  def __init__(self):
    self._queue: queue.Queue | None = None   # the running thread's
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
        # Each thread has its own queue: one still finishing a close's
        # work never takes what was queued for its successor.
        self._queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        args=(self._queue,),
                                        name="borrowed-kv-returns")
        self._thread.start()
      # Under the lock, so nothing lands behind the stop a close queues.
      self._queue.put((receipt, kv))

  def wait_idle(self, timeout_s: float = 10.0) -> bool:
    """Until every pending return is done (tests, shutdown)."""
    with self._lock:
      if self._thread is None:
        return self._pending == 0
      done = threading.Event()
      self._queue.put(done)
    return done.wait(timeout_s)

  def close(self, timeout_s: float = 10.0) -> bool:
    """Ends the waiter thread (engine shutdown) after it has given back
    every borrowed KV queued to it, each once its reading program is done.
    False when that took longer than ``timeout_s``: those KVs are then left
    to the thread, still waiting, rather than given back while possibly
    being read (the transport would lend the memory again)."""
    with self._lock:
      thread, q = self._thread, self._queue
      self._thread = self._queue = None
      if thread is None:
        return True
      q.put(None)
    thread.join(timeout_s)
    if thread.is_alive():
      log.warning("closing: %d borrowed KVs still being read after %.0f s; "
                  "they go back when their programs finish", self.pending,
                  timeout_s)
      return False
    return True

  def _run(self, q: queue.Queue) -> None:
    while True:
      item = q.get()
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
