"""The device transport's fast paths (pdjax.transfer.cuda_ipc), on CPU.

The CUDA driver is the fake one: "device memory" is host memory, handles are
shared through a registry as the host's driver shares them between two
processes, and copies move real bytes. So what these tests pin is what a GPU
cannot show cheaply: that the bytes landing are exactly the KV sent, that a
landing region is never handed to two transfers at once nor reused while a
sender may still write it, that every path gives its region back, and that
any fast-path problem becomes a fallback to jax.experimental.transfer rather
than a failed request. tests/gpu/test_cuda_ipc_gpu.py runs the real driver.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import random
import threading
import time
import types
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pdjax.engine.kv import pages_for, payload_pages
from pdjax.engine.prefill import PrefillConfig
from pdjax.engine.requests import RequestKV
from pdjax.transfer import cuda_ipc as ci
from pdjax.transfer.base import TransferDenied, TransferError, TransferTimeout
from pdjax.transfer.device import DeviceReceiver, DeviceSender
from pdjax.transfer.local import LocalKvExchange
from pdjax.v1 import decode_pb2, kv_pb2

MiB = 1 << 20
KV_SHAPE = (2, 2, 4, 4, 2, 8)   # [layers, 2, pages, page, kv_heads, head_dim]


class Clock:
  """A settable wall clock for leases."""

  def __init__(self, t: float = 1_000_000.0):
    self.t = t

  def __call__(self) -> float:
    return self.t


def _devices():
  return jax.devices()


def _kv(dtype=jnp.bfloat16, shape=KV_SHAPE, *, device=None, sharding=None,
        num_tokens=13, seed=0):
  """A KV payload whose every element has a distinct value."""
  n = int(np.prod(shape))
  rng = np.random.default_rng(seed)
  host = (rng.standard_normal(n).astype(np.float32) * 3).reshape(shape)
  arr = jnp.asarray(host, dtype)
  arr = jax.device_put(arr, sharding or device or _devices()[0])
  return RequestKV(arr, num_tokens)


def _bits(a) -> np.ndarray:
  a = np.asarray(jax.device_get(a))
  return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def _replica_sharding(first: int, tp: int) -> NamedSharding:
  mesh = Mesh(np.array(_devices()[first:first + tp]), ("tp",))
  return NamedSharding(mesh, PartitionSpec(None, None, None, None,
                                           "tp" if tp > 1 else None))


def _until(cond, timeout_s: float = 5.0) -> bool:
  """Polls ``cond`` until it holds (a background thread's work is done)."""
  deadline = time.monotonic() + timeout_s
  while not cond():
    if time.monotonic() > deadline:
      return False
    time.sleep(0.002)
  return True


def _dest(slot: ci.LandingSlot | None, tid: str, **kw) -> kv_pb2.KvDestination:
  d = kv_pb2.KvDestination(transport="device", transfer_id=tid,
                           decode_process_id="hostA:2:bbbb",
                           decode_hostname="hostA", decode_tp=1, **kw)
  if slot is not None:
    d.ipc_handle = slot.handle
    d.ipc_offset = slot.offset
    d.ipc_bytes = slot.nbytes
    d.ipc_deadline_ms = slot.deadline_ms
  return d


@pytest.fixture
def pair():
  """A fake prefill process and a fake decode process on one host: two
  drivers over one registry, a landing pool of 2 x 1 MiB on the decode
  side, clocks shared."""
  registry = ci.FakeIpcRegistry()
  clock = Clock()
  recv_driver = ci.FakeCudaDriver(registry)
  send_driver = ci.FakeCudaDriver(registry)
  pool = ci.LandingPool(recv_driver, 2, 2, MiB, lease_s=60.0, grace_s=2.0,
                        clock=clock)
  receiver = ci.CudaIpcReceiver(pool, _devices()[2])
  sender = ci.CudaIpcSender(send_driver, clock=clock)
  yield types.SimpleNamespace(registry=registry, clock=clock, pool=pool,
                              receiver=receiver, sender=sender,
                              send_driver=send_driver)
  sender.close()
  pool.close()


# ------------------------------------------------------------- path selection
@pytest.mark.parametrize("dest_kw, expected", [
    (dict(decode_process_id="hostA:1:aaaa"), "local"),
    (dict(decode_process_id="hostA:1:aaaa", ipc_handle=b"h" * 64), "local"),
    (dict(decode_process_id="hostA:2:bbbb", decode_hostname="hostA",
          ipc_handle=b"h" * 64), "cuda_ipc"),
    # Hostname from the process id when the router did not fill it in.
    (dict(decode_process_id="hostA:2:bbbb", ipc_handle=b"h" * 64),
     "cuda_ipc"),
    (dict(decode_process_id="hostA:2:bbbb", decode_hostname="hostA"),
     "transfer"),   # same host, but no landing buffer lent
    (dict(decode_process_id="hostB:2:bbbb", decode_hostname="hostB",
          ipc_handle=b"h" * 64), "transfer"),
    (dict(ipc_handle=b"h" * 64), "transfer"),   # nothing says where it is
    (dict(), "transfer"),
])
def test_select_path(dest_kw, expected):
  dest = kv_pb2.KvDestination(transfer_id="t", **dest_kw)
  assert ci.select_path(dest, my_process_id="hostA:1:aaaa",
                        my_hostname="hostA") == expected


def test_select_path_empty_process_ids_are_not_the_same_process():
  dest = kv_pb2.KvDestination(transfer_id="t")
  assert ci.select_path(dest, my_process_id="", my_hostname="") == "transfer"


# ------------------------------------------------------------- landing pool
def test_pool_exports_each_buffer_once_and_frees_them_on_close():
  registry = ci.FakeIpcRegistry()
  driver = ci.FakeCudaDriver(registry)
  pool = ci.LandingPool(driver, 0, 3, MiB)
  assert len(registry.allocations) == 3 and len(registry.handles) == 3
  assert pool.total_bytes == 3 * MiB and pool.free_bytes() == 3 * MiB
  pool.close()
  assert not registry.allocations and not registry.handles
  with pytest.raises(ci.CudaError, match="double free"):
    driver.mem_free(0, 12345)


def test_pool_acquire_is_aligned_best_fit_and_idempotent():
  pool = ci.LandingPool(ci.FakeCudaDriver(), 0, 2, MiB, clock=Clock())
  a = pool.acquire("a", 100)
  assert a.nbytes == ci.REGION_ALIGN and a.offset == 0
  assert pool.acquire("a", 100) is a                 # same id, same region
  assert pool.acquire("a", 2 * ci.REGION_ALIGN) is None   # it cannot grow
  b = pool.acquire("b", MiB - ci.REGION_ALIGN)       # the rest of buffer 0
  assert (b.buffer, b.offset) == (a.buffer, ci.REGION_ALIGN)
  c = pool.acquire("c", MiB)                          # all of buffer 1
  assert c.buffer != a.buffer and c.offset == 0
  assert pool.live() == 3 and pool.free_bytes() == 0
  assert pool.acquire("d", 1) is None                 # exhausted
  assert pool.acquire("e", MiB + 1) is None           # larger than a buffer
  assert pool.stats()["exhausted"] == 1 and pool.stats()["too_large"] == 1
  for tid in "abc":
    assert pool.begin_read(tid) is not None
    pool.end_read(tid)
  assert pool.live() == 0 and pool.free_bytes() == 2 * MiB
  # Freed regions coalesce: a whole buffer is one region again.
  assert pool.acquire("f", MiB) is not None
  pool.close()


def test_pool_regions_are_reused_after_a_read():
  pool = ci.LandingPool(ci.FakeCudaDriver(), 0, 1, MiB, clock=Clock())
  first = pool.acquire("a", MiB)
  assert pool.acquire("b", MiB) is None
  pool.begin_read("a")
  pool.end_read("a")
  again = pool.acquire("b", MiB)
  assert (again.buffer, again.offset, again.handle) == (
      first.buffer, first.offset, first.handle)
  pool.close()


def test_unread_release_waits_for_the_lease_to_end():
  """A sender may still be copying into a region whose transfer was
  cancelled: it is not lent again before the sender's deadline has passed."""
  clock = Clock()
  pool = ci.LandingPool(ci.FakeCudaDriver(), 0, 1, MiB, lease_s=60.0,
                        grace_s=2.0, clock=clock)
  pool.acquire("a", MiB)
  assert pool.release("a") is True
  assert pool.release("a") is False                  # never released twice
  assert pool.live() == 0 and pool.quarantined() == 1
  clock.t += 30
  assert pool.acquire("b", MiB) is None
  clock.t += 33                                       # past deadline + grace
  assert pool.acquire("b", MiB) is not None
  assert pool.quarantined() == 0
  pool.close()


def test_release_of_an_unused_region_frees_it_at_once():
  pool = ci.LandingPool(ci.FakeCudaDriver(), 0, 1, MiB, clock=Clock())
  pool.acquire("a", MiB)
  assert pool.release("a", writer_done=True)
  assert pool.acquire("b", MiB) is not None
  pool.close()


def test_release_during_a_read_is_deferred_to_its_end():
  pool = ci.LandingPool(ci.FakeCudaDriver(), 0, 1, MiB, clock=Clock())
  pool.acquire("a", MiB)
  assert pool.begin_read("a") is not None
  with pytest.raises(TransferError, match="already being read"):
    pool.begin_read("a")
  assert pool.release("a") is True          # e.g. the Decode call cancelled
  assert pool.live() == 1                   # still pinned by the reader
  assert pool.acquire("b", MiB) is None
  pool.end_read("a")
  assert pool.live() == 0 and pool.quarantined() == 0
  assert pool.acquire("b", MiB) is not None
  pool.close()


def test_a_failed_read_quarantines_the_region():
  clock = Clock()
  pool = ci.LandingPool(ci.FakeCudaDriver(), 0, 1, MiB, lease_s=10.0,
                        grace_s=1.0, clock=clock)
  pool.acquire("a", MiB)
  pool.begin_read("a")
  pool.end_read("a", ok=False)
  assert pool.live() == 0 and pool.quarantined() == 1
  assert pool.acquire("b", MiB) is None
  clock.t += 12
  assert pool.acquire("b", MiB) is not None
  pool.close()


def test_reap_reclaims_leases_that_ran_out_unread():
  clock = Clock()
  pool = ci.LandingPool(ci.FakeCudaDriver(), 0, 1, MiB, lease_s=5.0,
                        grace_s=1.0, clock=clock)
  pool.acquire("a", MiB // 2)
  pool.acquire("b", MiB // 2)
  pool.begin_read("b")                      # a reader pins its region
  clock.t += 5.5
  assert pool.reap() == 0                   # within the grace period
  clock.t += 1.0
  assert pool.reap() == 1                   # "a" expired; "b" is being read
  assert pool.live() == 1 and pool.begin_read("a") is None
  pool.end_read("b")
  assert pool.live() == 0 and pool.free_bytes() == MiB
  assert pool.stats()["expired"] == 1
  pool.close()


def test_pool_invariants_under_random_operations():
  """Lent and quarantined regions never overlap; every byte is accounted
  for; the pool empties when everything is given back."""
  rng = random.Random(0)
  clock = Clock()
  pool = ci.LandingPool(ci.FakeCudaDriver(), 0, 3, 64 * ci.REGION_ALIGN,
                        lease_s=10.0, grace_s=1.0, clock=clock)
  live: list[str] = []
  for step in range(3000):
    op = rng.random()
    if op < 0.45:
      tid = f"t{step}"
      if pool.acquire(tid, rng.randint(1, 40 * ci.REGION_ALIGN)):
        live.append(tid)
    elif op < 0.75 and live:
      tid = live.pop(rng.randrange(len(live)))
      if pool.begin_read(tid) is not None:
        pool.end_read(tid, ok=rng.random() < 0.9)
    elif op < 0.9 and live:
      tid = live.pop(rng.randrange(len(live)))
      pool.release(tid, writer_done=rng.random() < 0.3)
    else:
      clock.t += rng.random() * 3
      pool.reap()
    live = [t for t in live if pool._slots.get(t) is not None]
    regions = [(s.buffer, s.offset, s.offset + s.nbytes)
               for s in pool._slots.values()]
    regions += [(s.buffer, s.offset, s.offset + s.nbytes)
                for _, s in pool._quarantine]
    regions.sort()
    for (b1, _, e1), (b2, s2, _) in zip(regions, regions[1:]):
      assert b1 != b2 or e1 <= s2, "two owners of one landing region"
    used = sum(e - s for _, s, e in regions)
    assert used + pool.free_bytes() == pool.total_bytes
  for tid in live:
    pool.release(tid, writer_done=True)
  clock.t += 100
  pool.reap()
  assert pool.live() == 0 and pool.quarantined() == 0
  assert pool.free_bytes() == pool.total_bytes
  pool.close()


# ------------------------------------------------------- sender and receiver
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32, jnp.float16,
                                   jnp.float8_e4m3fn])
def test_bytes_that_land_are_the_kv_sent(pair, dtype):
  kv = _kv(dtype)
  slot = pair.pool.acquire("t1", kv.kv.nbytes)
  pair.receiver.expect("t1", "r1")
  handle = pair.sender.send(kv, _dest(slot, "t1"), timeout_s=5)
  assert handle.transport == "cuda_ipc" and list(handle.shape) == list(
      KV_SHAPE)
  assert pair.registry.bytes_copied == kv.kv.nbytes
  target = _replica_sharding(2, 1)
  out = pair.receiver.receive(handle, target, timeout_s=5)
  assert out.kv.dtype == dtype and out.kv.sharding == target
  assert out.num_tokens == kv.num_tokens
  np.testing.assert_array_equal(_bits(out.kv), _bits(kv.kv))
  # Lent until whoever took the KV has read it (the decode engine's insert).
  assert out.borrowed and pair.pool.live() == 1
  out.release()
  out.release()                         # idempotent
  assert pair.pool.live() == 0 and pair.pool.free_bytes() == 2 * MiB


def test_the_receiver_views_the_region_without_a_copy(pair):
  """On a one-device replica the KV the receiver returns *is* the landing
  region (the hand-off's only copy is the decode engine's insert)."""
  kv = _kv(jnp.bfloat16)
  slot = pair.pool.acquire("t1", kv.kv.nbytes)
  pair.receiver.expect("t1", "r1")
  handle = pair.sender.send(kv, _dest(slot, "t1"), timeout_s=5)
  dev = pair.receiver.device
  out = pair.receiver.receive(handle, NamedSharding(
      Mesh(np.array([dev]), ("tp",)), PartitionSpec()), timeout_s=5)
  assert out.kv.addressable_data(0).unsafe_buffer_pointer() == slot.ptr
  np.testing.assert_array_equal(_bits(out.kv), _bits(kv.kv))
  out.release()
  assert pair.pool.live() == 0


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float8_e4m3fn])
def test_a_region_lent_again_reuses_its_view_and_reads_the_new_bytes(pair,
                                                                     dtype):
  """An import costs about 0.3 ms on GPUs, so the receiver keeps its views:
  the next hand-off into the same bytes with the same shape reads through
  the same view, and sees the bytes of *that* hand-off; another shape (or
  another region) is imported afresh. (FP8 KV is viewed as its bytes and
  read as FP8 per hand-off, so a kept view never serves stale bytes.)"""
  target = _replica_sharding(2, 1)
  seen = []
  for i, (seed, shape) in enumerate([(1, KV_SHAPE), (2, KV_SHAPE),
                                     (3, (1,) + KV_SHAPE[1:])]):
    kv = _kv(dtype, shape, seed=seed)
    tid = f"t{i}"
    slot = pair.pool.acquire(tid, kv.kv.nbytes)
    assert (slot.buffer, slot.offset) == (0, 0)
    pair.receiver.expect(tid, "r")
    handle = pair.sender.send(kv, _dest(slot, tid), timeout_s=5)
    out = pair.receiver.receive(handle, target, timeout_s=5)
    np.testing.assert_array_equal(_bits(out.kv), _bits(kv.kv))
    seen.append((out.kv.addressable_data(0).unsafe_buffer_pointer(),
                 pair.receiver.view_imports,
                 pair.receiver.last_phases["imported"]))
    out.release()
  if dtype == jnp.bfloat16:     # the landing region itself, each time
    assert [s[0] for s in seen] == [pair.pool.acquire("x", 1).ptr] * 3
  assert [s[1:] for s in seen] == [(1, 1.0), (1, 0.0), (2, 1.0)]
  assert set(pair.sender.last_phases) == {"wait_ms", "issue_ms", "sync_ms",
                                          "first_copy_ms", "total_ms"}
  assert set(pair.receiver.last_phases) == {
      "wait_ms", "copies_pending", "view_ms", "imported", "after_wait_ms",
      "total_ms"}


def test_the_receiver_keeps_a_bounded_number_of_views(pair, monkeypatch):
  monkeypatch.setattr(ci.CudaIpcReceiver, "MAX_VIEWS", 2)
  target = _replica_sharding(2, 1)
  for i in range(4):
    kv = _kv(jnp.bfloat16, (i + 1,) + KV_SHAPE[1:])
    tid = f"t{i}"
    slot = pair.pool.acquire(tid, kv.kv.nbytes)
    pair.receiver.expect(tid, "r")
    out = pair.receiver.receive(
        pair.sender.send(kv, _dest(slot, tid), timeout_s=5), target,
        timeout_s=5)
    out.release()
  assert pair.receiver.view_imports == 4 and len(pair.receiver._views) == 2
  pair.receiver.close()
  assert not pair.receiver._views


def test_a_second_release_does_not_free_a_region_lent_again(pair):
  """A resharded RequestKV carries the same release function as the one it
  came from; whichever releases second must not free the region after it
  was lent to another transfer."""
  kv = _kv(jnp.bfloat16)
  slot = pair.pool.acquire("t1", kv.kv.nbytes)
  pair.receiver.expect("t1", "r1")
  handle = pair.sender.send(kv, _dest(slot, "t1"), timeout_s=5)
  out = pair.receiver.receive(handle, _replica_sharding(2, 1), timeout_s=5)
  other_holder = out.release_fn
  out.release()
  again = pair.pool.acquire("t2", kv.kv.nbytes)
  assert (again.buffer, again.offset) == (slot.buffer, slot.offset)
  other_holder()
  assert pair.pool.live() == 1 and pair.pool.acquire("t2", 1) is again


def test_landing_at_an_offset_and_into_a_tp_replica(pair):
  """A second region of a shared buffer (non-zero offset), a payload
  resharded onto a TP=2 decode replica."""
  first = pair.pool.acquire("other", 3 * ci.REGION_ALIGN)
  kv = _kv(jnp.bfloat16, seed=1)
  slot = pair.pool.acquire("t1", kv.kv.nbytes)
  assert slot.buffer == first.buffer and slot.offset > 0
  # Something already in the neighbouring region must survive the copy.
  ctypes.memset(first.ptr, 0x5A, first.nbytes)
  pair.receiver.expect("t1", "r1")
  handle = pair.sender.send(kv, _dest(slot, "t1"), timeout_s=5)
  target = _replica_sharding(2, 2)
  out = pair.receiver.receive(handle, target, timeout_s=5)
  assert out.kv.sharding == target
  np.testing.assert_array_equal(_bits(out.kv), _bits(kv.kv))
  assert ctypes.string_at(first.ptr, first.nbytes) == b"\x5a" * first.nbytes


def test_a_tp2_prefill_kv_is_gathered_before_the_copy(pair):
  kv = _kv(jnp.bfloat16, sharding=_replica_sharding(0, 2), seed=2)
  assert len(kv.kv.sharding.device_set) == 2
  slot = pair.pool.acquire("t1", kv.kv.nbytes)
  pair.receiver.expect("t1", "r1")
  handle = pair.sender.send(kv, _dest(slot, "t1"), timeout_s=5)
  out = pair.receiver.receive(handle, _replica_sharding(4, 1), timeout_s=5)
  np.testing.assert_array_equal(_bits(out.kv), _bits(kv.kv))


def test_a_too_small_landing_buffer_is_a_clear_transfer_error(pair):
  kv = _kv(jnp.bfloat16)
  slot = pair.pool.acquire("t1", kv.kv.nbytes // 2)
  dest = _dest(slot, "t1")
  dest.ipc_bytes = kv.kv.nbytes // 2
  with pytest.raises(TransferError, match=r"does not fit the \d+-byte "
                     "landing buffer"):
    pair.sender.send(kv, dest, timeout_s=5)
  assert pair.registry.copies == 0


def test_sender_refuses_without_a_handle_or_past_the_lease(pair):
  kv = _kv(jnp.bfloat16)
  with pytest.raises(TransferError, match="lent no landing buffer"):
    pair.sender.send(kv, _dest(None, "t0"), timeout_s=5)
  slot = pair.pool.acquire("t1", kv.kv.nbytes)
  pair.clock.t = slot.deadline - 0.5        # inside the sender's margin
  with pytest.raises(TransferError, match="past its lease"):
    pair.sender.send(kv, _dest(slot, "t1"), timeout_s=5)
  assert pair.registry.copies == 0


def test_sender_opens_each_handle_once_and_closes_them(pair):
  for i in range(3):
    kv = _kv(jnp.bfloat16, seed=i)
    slot = pair.pool.acquire(f"t{i}", kv.kv.nbytes)
    pair.receiver.expect(f"t{i}", "r")
    h = pair.sender.send(kv, _dest(slot, f"t{i}"), timeout_s=5)
    pair.receiver.receive(h, _replica_sharding(2, 1), timeout_s=5)
  assert sum(pair.registry.opened.values()) == 1   # one buffer, opened once
  pair.sender.close()
  assert sum(pair.registry.opened.values()) == 0


def test_sender_handle_cache_is_bounded():
  registry = ci.FakeIpcRegistry()
  pool = ci.LandingPool(ci.FakeCudaDriver(registry), 0, 4, MiB)
  sender = ci.CudaIpcSender(ci.FakeCudaDriver(registry), max_open_handles=2)
  for i in range(4):
    slot = pool.acquire(f"t{i}", MiB)
    sender.send(_kv(), _dest(slot, f"t{i}"), timeout_s=5)
    # A buffer whose copies may still run is never closed: once they are
    # retired, the next open may evict it.
    assert _until(lambda: sender.in_flight == 0)
  assert sum(registry.opened.values()) == 2
  sender.close()
  assert sum(registry.opened.values()) == 0
  pool.close()


@pytest.mark.parametrize("signal", ["sync", "event"])
def test_sender_never_closes_a_handle_its_copies_are_still_using(signal):
  """A send's copies run until its stream sync (in the send with the sync
  signal, in the retirement after it with the event signal): the handle
  cache's bound must not close that buffer's mapping under them (other
  sends opening more buffers meanwhile); it is closed once they have run."""
  registry = ci.FakeIpcRegistry()
  pool = ci.LandingPool(ci.FakeCudaDriver(registry), 0, 4, MiB)
  syncing, release = threading.Event(), threading.Event()

  class SlowSync(ci.FakeCudaDriver):
    def synchronize(self, ordinal):
      if threading.current_thread().name in ("slow-send", "cuda-ipc-retire"):
        syncing.set()
        assert release.wait(5)
      super().synchronize(ordinal)

  sender = ci.CudaIpcSender(SlowSync(registry), max_open_handles=1,
                            signal=signal)
  slots = [pool.acquire(f"t{i}", MiB) for i in range(4)]
  done = []
  slow = threading.Thread(name="slow-send", target=lambda: done.append(
      sender.send(_kv(), _dest(slots[0], "t0"), timeout_s=5)))
  slow.start()
  assert syncing.wait(5)
  for i in (1, 2):                       # two more buffers, bound of one
    sender.send(_kv(), _dest(slots[i], f"t{i}"), timeout_s=5)
  assert registry.opened[slots[0].handle] == 1    # still mapped
  release.set()
  slow.join(5)
  assert done and done[0].transport == "cuda_ipc"
  assert _until(lambda: sender.in_flight == 0)
  sender.send(_kv(), _dest(slots[3], "t3"), timeout_s=5)
  assert registry.opened[slots[0].handle] == 0    # now it could go
  assert sum(registry.opened.values()) == 1
  sender.close()
  pool.close()


# ------------------------------------------- completion signalled by an event
class HeldGpu(ci.FakeCudaDriver):
  """The prefill process's driver on a slow GPU: copies are deferred, and
  this process's own waits for them (the retirement's stream syncs) hang
  until ``go`` is set. So the copies run only when the receiver waits on
  the event, or once ``go`` is set: nothing else can make the bytes land."""

  def __init__(self, registry):
    super().__init__(registry, deferred=True)
    self.go = threading.Event()

  def synchronize(self, ordinal):
    assert self.go.wait(10), "the test never let the copies run"
    super().synchronize(ordinal)


@pytest.fixture
def slow():
  """``pair``, with deferred copies and a held sender-side wait."""
  registry = ci.FakeIpcRegistry()
  recv_driver = ci.FakeCudaDriver(registry, deferred=True)
  send_driver = HeldGpu(registry)
  pool = ci.LandingPool(recv_driver, 2, 2, MiB)
  receiver = ci.CudaIpcReceiver(pool, _devices()[2])
  sender = ci.CudaIpcSender(send_driver)
  yield types.SimpleNamespace(registry=registry, pool=pool, receiver=receiver,
                              sender=sender, send_driver=send_driver,
                              recv_driver=recv_driver)
  send_driver.go.set()
  sender.close()
  receiver.close()


def _grouped_kv(seed: int = 5) -> RequestKV:
  """A KV in two layer groups: a send of it is two copies, then the
  record."""
  whole = _kv(jnp.bfloat16, seed=seed).kv
  return RequestKV(None, 13, layer_groups=[whole[:1], whole[1:]])


def test_the_receiver_reads_the_region_only_after_the_senders_event(slow):
  """The sender returns with its copies still queued and its event's handle
  in the KvHandle; the region is still empty then. The receiver waits on
  the event, which runs them, and only then reads."""
  kv = _grouped_kv()
  want = _bits(kv.kv)
  slot = slow.pool.acquire("t1", kv.payload_bytes)
  slow.receiver.expect("t1", "r1")
  handle = slow.sender.send(kv, _dest(slot, "t1"), timeout_s=5)
  assert len(handle.ipc_event_handle) == ci.IPC_EVENT_HANDLE_BYTES
  assert slow.sender.last_phases["sync_ms"] == 0
  assert slow.sender.in_flight == 1
  assert slow.registry.copies == 0
  assert ctypes.string_at(slot.ptr, kv.payload_bytes) == bytes(
      kv.payload_bytes)                   # nothing has landed yet
  out = slow.receiver.receive(handle, _replica_sharding(2, 1), timeout_s=5)
  assert slow.registry.copies == 2        # both groups, by the wait
  np.testing.assert_array_equal(_bits(out.kv), want)
  assert slow.receiver.last_phases["copies_pending"] == 1.0
  assert slow.receiver.last_phases["wait_ms"] >= 0
  out.release()
  slow.send_driver.go.set()
  assert _until(lambda: slow.sender.in_flight == 0)


def test_a_receiver_that_skips_the_wait_reads_stale_bytes(slow, monkeypatch):
  """What the test above relies on: without the wait the receiver reads the
  region before the copies ran (on a GPU, a race it would mostly lose
  silently), so a receiver that skipped it would fail that test."""
  monkeypatch.setattr(slow.recv_driver, "event_synchronize",
                      lambda ordinal, event: None)
  kv = _kv(jnp.bfloat16, seed=6)
  slot = slow.pool.acquire("t1", kv.kv.nbytes)
  slow.receiver.expect("t1", "r1")
  handle = slow.sender.send(kv, _dest(slot, "t1"), timeout_s=5)
  out = slow.receiver.receive(handle, _replica_sharding(2, 1), timeout_s=5)
  got = _bits(out.kv)
  assert not got.any()                    # zeros: the copy had not run
  assert not np.array_equal(got, _bits(kv.kv))
  slow.send_driver.go.set()               # the GPU catches up
  assert _until(lambda: slow.sender.in_flight == 0)
  np.testing.assert_array_equal(_bits(out.kv), _bits(kv.kv))
  out.release()


def test_a_handle_without_an_event_is_read_at_once():
  """A sender that synchronizes (``signal="sync"``, as older senders did)
  sends no event; its copies have run before its handle exists, and the
  receiver reads without waiting."""
  registry = ci.FakeIpcRegistry()
  pool = ci.LandingPool(ci.FakeCudaDriver(registry, deferred=True), 2, 1, MiB)
  receiver = ci.CudaIpcReceiver(pool, _devices()[2])
  send_driver = ci.FakeCudaDriver(registry, deferred=True)
  sender = ci.CudaIpcSender(send_driver, signal="sync")
  kv = _kv(jnp.bfloat16, seed=7)
  slot = pool.acquire("t1", kv.kv.nbytes)
  receiver.expect("t1", "r1")
  handle = sender.send(kv, _dest(slot, "t1"), timeout_s=5)
  assert not handle.ipc_event_handle and send_driver.syncs == 1
  assert registry.bytes_copied == kv.kv.nbytes and sender.in_flight == 0
  out = receiver.receive(handle, _replica_sharding(2, 1), timeout_s=5)
  np.testing.assert_array_equal(_bits(out.kv), _bits(kv.kv))
  assert receiver.last_phases["copies_pending"] == 0.0
  assert not registry.events and not registry.events_opened
  out.release()
  with pytest.raises(ValueError, match="signal"):
    ci.CudaIpcSender(send_driver, signal="poll")
  sender.close()
  receiver.close()


def test_sources_live_until_their_copies_have_run(slow):
  """The copy reads the prefill's KV after ``send`` returned: the sender
  keeps the array (else XLA could reuse its memory under the copy) until
  the copy has run, and not longer."""
  kv = _kv(jnp.bfloat16, seed=8)
  want = _bits(kv.kv)
  source = weakref.ref(kv.kv)
  slot = slow.pool.acquire("t1", kv.kv.nbytes)
  slow.sender.send(kv, _dest(slot, "t1"), timeout_s=5)
  del kv
  gc.collect()
  assert source() is not None and slow.sender.in_flight == 1
  slow.send_driver.go.set()
  assert _until(lambda: slow.sender.in_flight == 0)
  gc.collect()
  assert source() is None
  # The retirement's wait ran the copy, with no receiver involved.
  got = np.frombuffer(ctypes.string_at(slot.ptr, want.nbytes), want.dtype)
  np.testing.assert_array_equal(got, want.reshape(-1))


def test_close_retires_the_copies_before_unmapping_and_destroys_events(slow):
  kv = _kv(jnp.bfloat16, seed=9)
  slot = slow.pool.acquire("t1", kv.kv.nbytes)
  slow.receiver.expect("t1", "r1")
  handle = slow.sender.send(kv, _dest(slot, "t1"), timeout_s=5)
  event_handle = handle.ipc_event_handle
  closing = threading.Thread(target=slow.sender.close)
  closing.start()
  closing.join(0.2)
  assert closing.is_alive()              # waiting for the copy to run
  assert slow.registry.opened[slot.handle] == 1 and slow.registry.events
  slow.send_driver.go.set()
  closing.join(5)
  assert not closing.is_alive() and slow.sender.in_flight == 0
  assert slow.registry.bytes_copied == kv.kv.nbytes
  assert not sum(slow.registry.opened.values())
  assert event_handle not in slow.registry.events    # destroyed
  # The receiver opened no event yet; one it opens it destroys on close.
  registry = ci.FakeIpcRegistry()
  pool = ci.LandingPool(ci.FakeCudaDriver(registry), 2, 1, MiB)
  receiver = ci.CudaIpcReceiver(pool, _devices()[2])
  sender = ci.CudaIpcSender(ci.FakeCudaDriver(registry))
  for i in range(2):                     # one event, opened once
    slot = pool.acquire(f"t{i}", kv.kv.nbytes)
    receiver.expect(f"t{i}", "r")
    handle = sender.send(kv, _dest(slot, f"t{i}"), timeout_s=5)
    receiver.receive(handle, _replica_sharding(2, 1), timeout_s=5).release()
  assert len(registry.events) == 1
  assert sum(registry.events_opened.values()) == 1
  receiver.close()
  assert sum(registry.events_opened.values()) == 0
  sender.close()
  assert not registry.events


def test_the_receiver_keeps_a_bounded_number_of_events(monkeypatch):
  """One event per sending device is kept open; a receiver that has seen
  more senders than MAX_EVENTS destroys the least recently used."""
  monkeypatch.setattr(ci.CudaIpcReceiver, "MAX_EVENTS", 2)
  registry = ci.FakeIpcRegistry()
  pool = ci.LandingPool(ci.FakeCudaDriver(registry), 2, 1, MiB)
  receiver = ci.CudaIpcReceiver(pool, _devices()[2])
  senders = [ci.CudaIpcSender(ci.FakeCudaDriver(registry)) for _ in range(3)]
  for i, sender in enumerate(senders + senders[:1]):
    kv = _kv(jnp.bfloat16, seed=i)
    slot = pool.acquire(f"t{i}", kv.kv.nbytes)
    receiver.expect(f"t{i}", "r")
    out = receiver.receive(sender.send(kv, _dest(slot, f"t{i}"), timeout_s=5),
                           _replica_sharding(2, 1), timeout_s=5)
    np.testing.assert_array_equal(_bits(out.kv), _bits(kv.kv))
    out.release()
  assert len(receiver._events) == 2
  assert sum(registry.events_opened.values()) == 2
  receiver.close()
  for sender in senders:
    sender.close()
  assert not registry.events and not sum(registry.events_opened.values())


def test_a_failed_send_waits_for_the_copies_it_issued():
  """A send that fails after some copies were issued syncs before it
  raises (nothing may still be writing into a region whose hand-off
  failed), hands nothing to the retirement and records no event."""
  registry = ci.FakeIpcRegistry()
  pool = ci.LandingPool(ci.FakeCudaDriver(registry), 2, 1, MiB)

  class SecondCopyFails(ci.FakeCudaDriver):
    def memcpy_dtod(self, ordinal, dst, src, nbytes):
      if self.copies_issued == 1:
        raise ci.CudaError("cuMemcpyDtoDAsync failed: CUDA_ERROR_UNKNOWN")
      super().memcpy_dtod(ordinal, dst, src, nbytes)

  driver = SecondCopyFails(registry, deferred=True)
  sender = ci.CudaIpcSender(driver)
  kv = _grouped_kv()
  slot = pool.acquire("t1", kv.payload_bytes)
  with pytest.raises(ci.CudaError, match="UNKNOWN"):
    sender.send(kv, _dest(slot, "t1"), timeout_s=5)
  assert driver.syncs == 1 and registry.copies == 1   # the first one ran
  assert sender.in_flight == 0 and not sender._copying
  assert not registry.events
  sender.close()
  pool.close()


def test_a_failed_wait_quarantines_the_region(slow, monkeypatch):
  """A driver error while waiting on the sender's event fails the hand-off
  as a failed read does: the region waits out its lease (the sender's
  copies may still run), and the error reaches the caller."""
  def broken(ordinal, event):
    raise ci.CudaError("cuEventSynchronize failed: CUDA_ERROR_LAUNCH_FAILED")

  monkeypatch.setattr(slow.recv_driver, "event_synchronize", broken)
  kv = _kv(jnp.bfloat16)
  slot = slow.pool.acquire("t1", kv.kv.nbytes)
  slow.receiver.expect("t1", "r1")
  handle = slow.sender.send(kv, _dest(slot, "t1"), timeout_s=5)
  with pytest.raises(ci.CudaError, match="LAUNCH_FAILED"):
    slow.receiver.receive(handle, _replica_sharding(2, 1), timeout_s=5)
  assert slow.pool.live() == 0 and slow.pool.quarantined() == 1


def test_receiver_refuses_what_was_not_lent_or_is_malformed(pair):
  kv = _kv(jnp.bfloat16)
  slot = pair.pool.acquire("t1", kv.kv.nbytes)
  handle = pair.sender.send(kv, _dest(slot, "t1"), timeout_s=5)
  target = _replica_sharding(2, 1)
  with pytest.raises(TransferDenied):
    pair.receiver.receive(handle, target, timeout_s=5)   # no expect()
  pair.receiver.expect("t1", "r1", max_pages=1)
  with pytest.raises(TransferError, match="exceeds the 1 reserved"):
    pair.receiver.receive(handle, target, timeout_s=5)
  pair.receiver.expect("t1", "r1")
  bad = kv_pb2.KvHandle()
  bad.CopyFrom(handle)
  del bad.shape[-1]
  with pytest.raises(TransferError, match="is not \\[layers"):
    pair.receiver.receive(bad, target, timeout_s=5)
  bad.CopyFrom(handle)
  bad.dtype = "complex128"
  with pytest.raises(TransferError, match="cannot be viewed through DLPack"):
    pair.receiver.receive(bad, target, timeout_s=5)
  assert pair.pool.live() == 1          # checks come before the region
  bad.CopyFrom(handle)
  bad.shape[2] = 1 << 20                # would read past the region
  with pytest.raises(TransferError, match="cannot be in the"):
    pair.receiver.receive(bad, target, timeout_s=5)
  # That failed read could not vouch for the sender: the region waits.
  assert pair.pool.live() == 0 and pair.pool.quarantined() == 1


def test_receive_after_the_lease_was_reaped_times_out(pair):
  kv = _kv(jnp.bfloat16)
  slot = pair.pool.acquire("t1", kv.kv.nbytes)
  pair.receiver.expect("t1", "r1")
  handle = pair.sender.send(kv, _dest(slot, "t1"), timeout_s=5)
  pair.clock.t += 120
  assert pair.receiver.reap() == 1
  with pytest.raises(TransferTimeout):
    pair.receiver.receive(handle, _replica_sharding(2, 1), timeout_s=5)
  assert pair.receiver.live() == 0


def test_forget_returns_the_region(pair):
  pair.pool.acquire("t1", MiB)
  pair.receiver.expect("t1", "r1")
  pair.receiver.forget("t1")
  assert pair.receiver.live() == 0
  pair.receiver.forget("t1")                 # idempotent


# --------------------------------------------------------------- auto device
@pytest.fixture
def auto():
  """Prefill and decode sides of the device transport, fast paths on, with
  the fake driver: the "decode process" is hostA:2, the sender hostA:1."""
  devs = _devices()
  registry = ci.FakeIpcRegistry()
  clock = Clock()
  geometry = (KV_SHAPE[0], KV_SHAPE[3], KV_SHAPE[4], KV_SHAPE[5], "bfloat16",
              16)
  exchange = LocalKvExchange()
  receiver = ci.make_receiver(
      DeviceReceiver(devs[2]), devs[2], geometry=geometry,
      landing_buffers=1, landing_bytes=MiB,
      driver=ci.FakeCudaDriver(registry))
  receiver.ipc.pool._clock = clock
  receiver.local = ci.LocalReceiver(exchange)
  sender = ci.make_sender(DeviceSender(devs[0]), process_id="hostA:1:aaaa",
                          hostname="hostA",
                          driver=ci.FakeCudaDriver(registry))
  sender.ipc._clock = clock
  sender.local = ci.LocalSender(exchange)
  yield types.SimpleNamespace(receiver=receiver, sender=sender, clock=clock,
                              registry=registry, target=_replica_sharding(2, 2))
  sender.close()
  receiver.close()


def _reserve(auto, tid: str, prompt_tokens: int, *, process="hostA:2:bbbb",
             host="hostA"):
  """What Reserve and the router do: lend, then build the destination."""
  auto.receiver.expect(tid, "r-" + tid)
  slot = auto.receiver.lend_landing(tid, prompt_tokens)
  dest = _dest(slot, tid)
  dest.decode_process_id = process
  dest.decode_hostname = host
  return slot, dest


def test_auto_same_host_takes_cuda_ipc(auto):
  kv = _kv(jnp.bfloat16)
  slot, dest = _reserve(auto, "t1", kv.num_tokens)
  assert slot is not None and slot.nbytes >= kv.kv.nbytes
  handle = auto.sender.send(kv, dest, timeout_s=5)
  assert handle.transport == "cuda_ipc"
  out = auto.receiver.receive(handle, auto.target, timeout_s=5)
  np.testing.assert_array_equal(_bits(out.kv), _bits(kv.kv))
  assert auto.sender.paths == {"cuda_ipc": 1}
  assert auto.receiver.live() == 1 and out.borrowed   # until it is read
  out.release()
  assert auto.receiver.live() == 0 and auto.sender.live() == 0


def test_auto_other_host_takes_transfer_and_returns_the_region(auto):
  kv = _kv(jnp.bfloat16)
  slot, dest = _reserve(auto, "t1", kv.num_tokens, process="hostB:2:bbbb",
                        host="hostB")
  assert slot is not None
  handle = auto.sender.send(kv, dest, timeout_s=5)
  assert handle.transport == "device" and handle.pull_uuid
  assert auto.receiver.live() == 1       # the region lent at Reserve
  assert auto.sender.live() == 1         # the KV registered for the pull
  out = auto.receiver.receive(handle, auto.target, timeout_s=10)
  np.testing.assert_array_equal(_bits(out.kv), _bits(kv.kv))
  auto.sender.release("t1")
  assert auto.registry.copies == 0
  # The sender never wrote the region: it is free at once, not quarantined.
  assert auto.receiver.live() == 0 and auto.receiver.ipc.pool.quarantined() == 0
  assert auto.sender.live() == 0


def test_auto_falls_back_when_the_region_is_too_small(auto):
  """The decode side's size guess was short (a larger prefill bucket): the
  hand-off still succeeds, over the transfer path."""
  kv = _kv(jnp.bfloat16)
  slot, dest = _reserve(auto, "t1", kv.num_tokens)
  dest.ipc_bytes = kv.kv.nbytes - 1
  handle = auto.sender.send(kv, dest, timeout_s=5)
  assert handle.transport == "device"
  assert auto.sender.fallbacks == {"TransferError": 1}
  out = auto.receiver.receive(handle, auto.target, timeout_s=10)
  np.testing.assert_array_equal(_bits(out.kv), _bits(kv.kv))
  auto.sender.release("t1")
  assert auto.receiver.live() == 0 and auto.sender.live() == 0


def test_auto_falls_back_when_the_handle_cannot_be_opened(auto):
  """Same hostname, different machines (or a restarted decode worker)."""
  auto.sender.ipc.driver.fail_open = True
  kv = _kv(jnp.bfloat16)
  _, dest = _reserve(auto, "t1", kv.num_tokens)
  handle = auto.sender.send(kv, dest, timeout_s=5)
  assert handle.transport == "device"
  auto.receiver.receive(handle, auto.target, timeout_s=10)
  auto.sender.release("t1")
  assert auto.receiver.live() == 0 and auto.sender.live() == 0


def test_auto_same_process_takes_the_local_path(auto):
  kv = _kv(jnp.bfloat16)
  _, dest = _reserve(auto, "t1", kv.num_tokens, process="hostA:1:aaaa")
  handle = auto.sender.send(kv, dest, timeout_s=5)
  assert handle.transport == "local"
  assert auto.sender.live() == 1                 # parked until redeemed
  out = auto.receiver.receive(handle, auto.target, timeout_s=5)
  np.testing.assert_array_equal(_bits(out.kv), _bits(kv.kv))
  assert auto.sender.live() == 0 and auto.receiver.live() == 0


def test_auto_cancelled_reservation_returns_the_region_after_its_lease(auto):
  kv = _kv(jnp.bfloat16)
  _reserve(auto, "t1", kv.num_tokens)
  auto.receiver.forget("t1")                     # Unreserve
  pool = auto.receiver.ipc.pool
  assert auto.receiver.live() == 0 and pool.quarantined() == 1
  auto.clock.t += pool.lease_s + pool.grace_s + 1
  auto.receiver.reap()
  assert pool.quarantined() == 0 and pool.free_bytes() == pool.total_bytes


def test_auto_stops_lending_after_a_driver_failure(auto):
  """A broken CUDA stack (e.g. JAX refusing the DLPack view) fails the
  hand-off in flight, and sends every later one over the transfer path."""
  kv = _kv(jnp.bfloat16)
  _, dest = _reserve(auto, "t1", kv.num_tokens)
  handle = auto.sender.send(kv, dest, timeout_s=5)
  assert handle.transport == "cuda_ipc"

  def broken(*a, **k):
    raise ci.CudaError("importing a landing buffer into JAX failed: no view")

  auto.receiver.ipc.pool.driver.view = broken
  with pytest.raises(ci.CudaError):
    auto.receiver.receive(handle, auto.target, timeout_s=5)
  assert "no view" in auto.receiver.ipc_disabled
  slot, dest = _reserve(auto, "t2", kv.num_tokens)
  assert slot is None and not dest.ipc_handle
  handle = auto.sender.send(kv, dest, timeout_s=5)
  assert handle.transport == "device"
  out = auto.receiver.receive(handle, auto.target, timeout_s=10)
  np.testing.assert_array_equal(_bits(out.kv), _bits(kv.kv))
  auto.sender.release("t2")
  assert auto.receiver.live() == 0 and auto.sender.live() == 0


def test_auto_unknown_transport_is_refused(auto):
  _reserve(auto, "t1", 13)
  h = kv_pb2.KvHandle(transport="grpc", transfer_id="t1", num_tokens=13,
                      shape=list(KV_SHAPE), dtype="bfloat16")
  with pytest.raises(TransferError, match="'grpc'"):
    auto.receiver.receive(h, auto.target, timeout_s=1)
  assert auto.receiver.live() == 0


def test_make_on_cpu_without_a_driver_is_the_plain_device_transport():
  assert jax.default_backend() == "cpu"
  assert not ci.fast_path_on("auto") and not ci.fast_path_on("off")
  devs = _devices()
  s = ci.make_sender(DeviceSender(devs[0]), process_id="x:1:a")
  r = ci.make_receiver(DeviceReceiver(devs[1]), devs[1],
                       geometry=(2, 4, 2, 8, "bfloat16", 16))
  assert s.ipc is None and s.local is None
  assert r.ipc is None and r.local is None
  assert r.lend_landing("t", 100) is None
  # Same process id, but the fast path is off: jax.experimental.transfer.
  kv = _kv(jnp.bfloat16)
  r.expect("t1", "r1")
  h = s.send(kv, kv_pb2.KvDestination(transfer_id="t1",
                                      decode_process_id="x:1:a"),
             timeout_s=5)
  assert h.transport == "device"
  out = r.receive(h, _replica_sharding(1, 1), timeout_s=10)
  np.testing.assert_array_equal(_bits(out.kv), _bits(kv.kv))
  s.release("t1")
  assert s.live() == 0 and r.live() == 0
  s.close()
  r.close()


def test_make_receiver_pool_defaults_to_the_largest_payload():
  geometry = (2, 4, 2, 8, "bfloat16", 16)
  page_bytes = 2 * 2 * 4 * 2 * 8 * 2
  assert ci.page_bytes_of(geometry) == page_bytes
  r = ci.make_receiver(DeviceReceiver(_devices()[1]), _devices()[1],
                       geometry=geometry, landing_buffers=2,
                       driver=ci.FakeCudaDriver())
  pool = r.ipc.pool
  assert pool.buffer_bytes == (16 * page_bytes // ci.REGION_ALIGN
                               * ci.REGION_ALIGN)
  assert len(pool._bases) == 2
  r.close()


@pytest.mark.parametrize("buckets", [(16, 32, 64, 128), (48, 96, 128),
                                     (16, 32, 64, 128, 256, 512)])
def test_landing_size_matches_what_prefill_sends(buckets):
  """The region lent at Reserve is exactly the payload the prefill engine
  makes for that prompt (bucket pages, or chunked prefill's power of two)."""
  cfg = PrefillConfig(buckets=buckets, page_size=16, max_seq_len=1024)
  size = ci.landing_payload_bytes(1000, 16, buckets=buckets)
  for n in [1, 15, 16, 17, 47, 48, 49, 100, 128, 129, 300, 1000]:
    b = cfg.bucket_for(n)
    pages = b // 16 if b is not None else payload_pages(pages_for(n, 16))
    assert size(n) == pages * 1000, n
  # Without the bucket list: the power-of-two page count.
  assert ci.landing_payload_bytes(1000, 16)(100) == 8 * 1000


# ------------------------------------------------- the decode service's part
class _Ctx:
  async def abort(self, code, details):
    raise AssertionError(f"aborted: {code} {details}")


class _Aborted(Exception):
  pass


class _RecordingCtx:
  def __init__(self):
    self.code = None

  async def abort(self, code, details):
    self.code = code
    raise _Aborted(details)


def _lending_decode_service(registry):
  """A DecodeServicer over a fake engine whose receiver has a landing pool
  of one buffer (fake CUDA driver)."""
  from fake_engines import FakeDecodeBackend
  from pdjax.service.decode_service import DecodeServicer, DecodeWorker
  devs = _devices()
  receiver = ci.make_receiver(
      DeviceReceiver(devs[1]), devs[1],
      geometry=(2, 4, 2, 8, "bfloat16", 16), landing_buffers=1,
      driver=ci.FakeCudaDriver(registry))
  worker = DecodeWorker(FakeDecodeBackend(page_size=4), receiver)
  return DecodeServicer(worker, None), receiver


def test_reserve_response_has_no_landing_fields():
  """ReserveResponse.ipc_* were dropped (regions are lent by LendLanding);
  their numbers and names stay reserved so an old peer's bytes are never
  read as another field, and such bytes still parse."""
  fields = decode_pb2.ReserveResponse.DESCRIPTOR.fields_by_name
  assert not [n for n in fields if n.startswith("ipc_")]
  from google.protobuf import descriptor_pb2
  proto = descriptor_pb2.DescriptorProto()
  decode_pb2.ReserveResponse.DESCRIPTOR.CopyToProto(proto)
  assert set(proto.reserved_name) == {"ipc_handle", "ipc_offset", "ipc_bytes",
                                      "ipc_device", "ipc_deadline_ms"}
  nums = {n for r in proto.reserved_range for n in range(r.start, r.end)}
  assert nums == {3, 4, 5, 6, 8}
  # What an older worker sent: replica=1, pages=2, ipc_handle=b"h" (3).
  old = bytes([0x08, 1, 0x10, 2, 0x1a, 1]) + b"h"
  res = decode_pb2.ReserveResponse.FromString(old)
  assert (res.replica, res.pages) == (1, 2)


def test_decode_service_lends_when_asked_and_unreserve_returns():
  """Reserve lends nothing (a region lent then would idle while the request
  queues for prefill); LendLanding lends for a reserved transfer only, and
  Unreserve returns the region."""
  import grpc
  registry = ci.FakeIpcRegistry()
  servicer, receiver = _lending_decode_service(registry)

  async def go():
    req = decode_pb2.ReserveRequest(request_id="r1", prompt_tokens=9,
                                    max_tokens=4, transfer_id="t1")
    await servicer.Reserve(req, _Ctx())
    assert receiver.live() == 0
    ctx = _RecordingCtx()
    with pytest.raises(_Aborted, match="not issued"):
      await servicer.LendLanding(decode_pb2.LendLandingRequest(
          transfer_id="t-forged", prompt_tokens=9), ctx)
    assert ctx.code == grpc.StatusCode.PERMISSION_DENIED
    lent = await servicer.LendLanding(decode_pb2.LendLandingRequest(
        transfer_id="t1", prompt_tokens=9), _Ctx())
    assert len(lent.ipc_handle) == ci.IPC_HANDLE_BYTES
    assert lent.ipc_bytes >= 4 * ci.page_bytes_of(
        (2, 4, 2, 8, "bfloat16", 16))       # 9 tokens: 3 pages -> 4
    assert lent.ipc_deadline_ms > 0 and lent.ipc_device == 1
    assert receiver.live() == 1
    await servicer.Unreserve(decode_pb2.UnreserveRequest(request_id="r1"),
                             _Ctx())
    assert receiver.live() == 0
    with pytest.raises(_Aborted):         # forgotten: no region any more
      await servicer.LendLanding(decode_pb2.LendLandingRequest(
          transfer_id="t1", prompt_tokens=9), _RecordingCtx())

  asyncio.run(go())
  receiver.close()


def test_prefill_side_asks_for_a_region_and_writes_into_it():
  """LandingRequests against a real gRPC decode service: asked for as the
  prefill starts, the region lands in the destination, the CUDA IPC
  sender writes the KV into it and the receiver reads it back. Another
  host, or a failing call, leaves the destination as it was."""
  import grpc
  from pdjax.service.landing import LandingRequests
  from pdjax.v1 import decode_pb2_grpc
  registry = ci.FakeIpcRegistry()
  servicer, receiver = _lending_decode_service(registry)
  sender = ci.make_sender(DeviceSender(_devices()[0]), process_id="hostA:1:a",
                          hostname="hostA",
                          driver=ci.FakeCudaDriver(registry))
  kv = _kv(jnp.bfloat16, (2, 2, 4, 4, 2, 8), num_tokens=13)

  async def go():
    server = grpc.aio.server()
    decode_pb2_grpc.add_DecodeServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    landing = LandingRequests(sender)
    try:
      await servicer.Reserve(decode_pb2.ReserveRequest(
          request_id="r1", prompt_tokens=13, max_tokens=4,
          transfer_id="t1"), _Ctx())
      dest = kv_pb2.KvDestination(
          transport="device", transfer_id="t1",
          decode_address=f"127.0.0.1:{port}",
          decode_process_id="hostA:2:b", decode_hostname="hostA")
      assert sender.wants_landing(dest)
      pending = landing.request(dest, 13)
      filled = await asyncio.to_thread(landing.apply, dest, pending)
      assert filled.ipc_handle and not dest.ipc_handle
      assert not sender.wants_landing(filled)     # it has one now
      handle = sender.send(kv, filled, timeout_s=5)
      assert handle.transport == "cuda_ipc"
      out = receiver.receive(handle, NamedSharding(
          Mesh(np.array([_devices()[1]]), ("tp",)), PartitionSpec()),
          timeout_s=5)
      np.testing.assert_array_equal(_bits(out.kv), _bits(kv.kv))
      out.release()
      assert receiver.live() == 0
      # Another host: nothing is asked. A forged id: refused, dest as is.
      other = kv_pb2.KvDestination()
      other.CopyFrom(dest)
      other.decode_hostname = "hostB"
      other.decode_process_id = "hostB:2:b"
      assert landing.request(other, 13) is None
      forged = kv_pb2.KvDestination()
      forged.CopyFrom(dest)
      forged.transfer_id = "t-forged"
      same = await asyncio.to_thread(landing.apply, forged,
                                     landing.request(forged, 13))
      assert same == forged and not same.ipc_handle
      assert landing.asked == 2 and landing.lent == 1
    finally:
      landing.close()
      await server.stop(None)

  asyncio.run(go())
  sender.close()
  receiver.close()


def test_prefill_worker_asks_for_a_region_before_prefill_and_uses_it():
  """The prefill worker asks for every request's landing region as it
  starts the batch, from its pool (the calls' start does not hold up the
  prefill; the answer arrives while it computes), and sends into the
  destination the answer filled in."""
  from pdjax.engine.requests import PrefillRequest, PrefillResult
  from pdjax.engine.sampling import SamplingParams
  from pdjax.service.prefill_service import PrefillWorker, _Job
  from pdjax.transfer.base import KvSender, handle_for

  events = []

  from fake_engines import FakePrefillEngine

  class Engine(FakePrefillEngine):
    config = types.SimpleNamespace(max_batch=4)

    def prefill(self, reqs, kv_ready=None, on_result=None):
      events.append("prefill")
      out = [PrefillResult(r.request_id, 5, -0.1, _kv(), len(r.prompt_ids))
             for r in reqs]
      for i, r in enumerate(out):
        kv_ready(i, r.kv)
      return out

  class Landing:
    def request(self, dest, prompt_tokens):
      events.append(("ask", dest.transfer_id, prompt_tokens))
      return f"answer-{dest.transfer_id}"

    def apply(self, dest, pending):
      events.append(("apply", pending))
      out = kv_pb2.KvDestination()
      out.CopyFrom(dest)
      out.ipc_offset = 4096
      return out

    def close(self):
      events.append("closed")

  class Sender(KvSender):
    name = "fake"

    def send(self, kv, dest, *, timeout_s):
      events.append(("send", dest.transfer_id, dest.ipc_offset))
      return handle_for(kv, self.name, dest.transfer_id)

  async def go():
    loop = asyncio.get_running_loop()
    worker = PrefillWorker(Engine(), Sender(), landing=Landing())
    worker.start()
    try:
      job = _Job(PrefillRequest("r1", [3, 4, 5], SamplingParams(max_tokens=4)),
                 kv_pb2.KvDestination(transfer_id="t1"), None,
                 loop.create_future(), loop.create_future(), loop)
      worker.submit(job)
      first = await asyncio.wait_for(job.first, 10)
      sent = await asyncio.wait_for(job.future, 10)
      assert first.first_token == 5 and sent.kv.transfer_id == "t1"
    finally:
      worker.stop()

  asyncio.run(go())
  # The ask and the prefill run on two threads: either may come first.
  assert sorted(events[:2], key=str) == [("ask", "t1", 3), "prefill"]
  assert events[2:] == [("apply", "answer-t1"), ("send", "t1", 4096),
                        "closed"]


def test_a_kv_received_for_a_cancelled_decode_call_is_given_back():
  """The receive runs on a worker thread that a cancelled RPC cannot stop;
  a borrowed KV it brings afterwards goes back to the transport."""
  import threading
  from pdjax.service import decode_service

  go_on, released = threading.Event(), []

  class SlowReceiver:
    def receive(self, handle, sharding, *, timeout_s):
      assert go_on.wait(10)
      return RequestKV(jnp.zeros((1,)), 1,
                       release_fn=lambda: released.append(handle.transfer_id))

  async def go():
    task = asyncio.ensure_future(decode_service._receive(
        SlowReceiver(), kv_pb2.KvHandle(transfer_id="t1"), None,
        timeout_s=5))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
      await task
    assert released == []
    go_on.set()
    for _ in range(100):
      if released:
        break
      await asyncio.sleep(0.02)

  asyncio.run(go())
  assert released == ["t1"]


def test_device_failure_names_out_of_memory():
  from pdjax.transfer.base import TransferExhausted, device_failure
  oom = device_failure(RuntimeError(
      "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB "
      "with allocator GPU_0_bfc\nCurrent allocation summary follows."),
                       "KV pull t1")
  assert isinstance(oom, TransferExhausted)
  assert "out of memory" in str(oom) and "summary" not in str(oom)
  other = device_failure(RuntimeError("INTERNAL: stream failed"), "KV pull")
  assert type(other) is TransferError and "stream failed" in str(other)


@pytest.mark.parametrize("error, code", [
    ("exhausted", "RESOURCE_EXHAUSTED"), ("unforeseen", "INTERNAL"),
    ("timeout", "DEADLINE_EXCEEDED"), ("budget", "RESOURCE_EXHAUSTED")])
def test_failed_receive_answers_its_status_and_returns_the_slot(error, code):
  """A KV that cannot land (the device out of memory, an error no transport
  foresaw, a timeout, no room in the worker's receive budget until the
  deadline) gets the gRPC code it means, with the message, and the
  request's reservation and issued id go back at once."""
  import grpc
  from fake_engines import FakeDecodeBackend
  from pdjax.service.decode_service import DecodeServicer, DecodeWorker
  from pdjax.transfer.base import KvReceiver, TransferExhausted
  raised = {"exhausted": TransferExhausted("KV pull t1: the device is out "
                                           "of memory"),
            "unforeseen": RuntimeError("boom"),
            "timeout": TransferTimeout("KV pull t1 did not complete"),
            "budget": AssertionError("never received: no room")}[error]
  forgotten, failures = [], []

  class Receiver(KvReceiver):
    name = "device"

    def receive(self, handle, sharding, *, timeout_s):
      raise raised

    def forget(self, tid):
      forgotten.append(tid)

  engine = FakeDecodeBackend()
  worker = DecodeWorker(engine, Receiver(), max_receive_bytes=1024,
                        transfer_timeout_s=0.2 if error == "budget" else 5.0)
  budget = worker.receive_budget
  if error == "budget":
    budget.held = 1000      # another receive holds most of it
  counter = types.SimpleNamespace(inc=lambda: None)
  worker.metrics = types.SimpleNamespace(
      transfer_failures=types.SimpleNamespace(
          labels=lambda *a: failures.append(a) or counter))
  asyncio.run(DecodeServicer(worker, None).Reserve(
      decode_pb2.ReserveRequest(request_id="r1", prompt_tokens=3,
                                max_tokens=4, transfer_id="t1"), _Ctx()))
  ctx = _RecordingCtx()
  ctx.time_remaining = lambda: None
  request = decode_pb2.DecodeRequest(
      request_id="r1", prompt_token_ids=[1, 2, 3], first_token=4,
      kv=kv_pb2.KvHandle(transfer_id="t1", shape=[1, 2, 1, 2, 2, 8],
                         dtype="float32", transport="transfer"))
  request.sampling.max_tokens = 4

  async def run():
    async for _ in DecodeServicer(worker, None).Decode(request, ctx):
      pass

  with pytest.raises(_Aborted, match={"exhausted": "out of memory",
                                      "unforeseen": "boom",
                                      "timeout": "did not complete",
                                      "budget": "receive budget"}[error]):
    asyncio.run(run())
  assert ctx.code == getattr(grpc.StatusCode, code)
  assert engine.reservations == {} and engine.returned == 1
  assert forgotten == ["t1"] and len(worker.handoffs) == 0
  want = "TransferExhausted" if error == "budget" else type(raised).__name__
  assert worker.streams == 0 and failures[0][1] == want
  assert budget.held == (1000 if error == "budget" else 0)
