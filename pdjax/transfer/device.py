"""The ``device`` transport: ``jax.experimental.transfer`` between processes.

Each worker runs a transfer server. The prefill side lays the request KV out
with as many kv-head shards as both sides can hold (``gcd`` of the two TP
degrees: sender and receiver must agree on the shard count), registers it
with ``await_pull`` under a random 63-bit id, and keeps a reference until the
decode side confirms (ReleaseKv) or the TTL passes; the server itself drops
an unpulled registration at the same deadline. The decode side pulls into
its own devices with the same shard count and reshards to the replica's
layout (``reshard_kv``).

A pull of an id that was never (or is no longer) registered does not fail,
it never completes, so the receiver polls readiness against a deadline and
reports ``TransferTimeout``; the orphaned destination buffer is dropped.
"""

from __future__ import annotations

import collections
import datetime
import math
import threading
import time

import jax
import numpy as np
from jax.experimental import transfer
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pdjax.engine.kv import reshard_kv
from pdjax.engine.requests import RequestKV
from pdjax.transfer.base import (IssuedKvReceiver, KvSender, LeaseTable,
                                 TransferTimeout, device_failure, handle_for,
                                 new_pull_uuid)
from pdjax.v1 import kv_pb2

_KV_HEADS_AXIS = 4


def _start_server(device, host: str, connections: int):
  return transfer.start_transfer_server(
      device.client, f"{host}:0", [f"{host}:0"] * connections)


def kv_head_shards(sharding) -> int:
  """How many ways a KV array's kv_heads axis is split."""
  spec = getattr(sharding, "spec", None)
  if spec is None or len(spec) <= _KV_HEADS_AXIS or spec[_KV_HEADS_AXIS] is None:
    return 1
  axes = spec[_KV_HEADS_AXIS]
  axes = (axes,) if isinstance(axes, str) else axes
  return int(np.prod([sharding.mesh.shape[a] for a in axes]))


def transfer_sharding(devices, shards: int) -> NamedSharding:
  """kv_heads split ``shards`` ways over the first ``shards`` devices."""
  mesh = Mesh(np.array(list(devices)[:shards], dtype=object), ("tp",))
  spec = [None] * 6
  spec[_KV_HEADS_AXIS] = "tp" if shards > 1 else None
  return NamedSharding(mesh, PartitionSpec(*spec))


def layer_groups(num_layers: int, stages: int) -> int:
  """How many layer groups a KV for a destination of ``stages`` pipeline
  stages is sent in: one per stage, or 1 (whole) when there are none."""
  if stages > 1 and num_layers % stages == 0:
    return stages
  return 1


def stage_leaders(sharding: NamedSharding, stages: int) -> list:
  """The first device of each pipeline stage (the ``pp`` axis) of a
  replica's layout, in stage order."""
  mesh = sharding.mesh
  if "pp" not in mesh.axis_names or mesh.shape["pp"] != stages:
    raise ValueError(f"a KV sent in {stages} layer groups needs a layout "
                     f"with {stages} pipeline stages, got mesh {mesh.shape}")
  devs = np.moveaxis(mesh.devices, mesh.axis_names.index("pp"), 0)
  return list(devs.reshape(stages, -1)[:, 0])


def _ordered_devices(sharding) -> list:
  mesh = getattr(sharding, "mesh", None)
  if mesh is not None:
    return list(mesh.devices.flat)
  return sorted(sharding.device_set, key=lambda d: d.id)


class DeviceSender(KvSender):
  name = "device"

  def __init__(self, device, *, host: str = "127.0.0.1",
               advertise_host: str | None = None, connections: int = 4,
               ttl_s: float = 60.0):
    self.ttl_s = ttl_s
    self._server = _start_server(device, host, connections)
    self._advertise = _advertised(self._server.address(), advertise_host)
    self.leases = LeaseTable(ttl_s)

  def address(self) -> str:
    return self._advertise

  def send(self, kv: RequestKV, dest: kv_pb2.KvDestination, *,
           timeout_s: float) -> kv_pb2.KvHandle:
    stages = layer_groups(kv.kv.shape[0], dest.decode_pp)
    if stages > 1:
      # A pipelined replica: one array per stage, its layers only, each
      # pulled straight onto that stage's devices.
      devices = _ordered_devices(kv.kv.sharding)
      step = kv.kv.shape[0] // stages
      arrs = [jax.device_put(kv.kv[s * step:(s + 1) * step],
                             transfer_sharding([devices[s % len(devices)]], 1))
              for s in range(stages)]
      shards = 1
    else:
      shards = math.gcd(kv_head_shards(kv.kv.sharding),
                        max(dest.decode_tp, 1))
      target = transfer_sharding(_ordered_devices(kv.kv.sharding), shards)
      arrs = [jax.device_put(kv.kv, target)]
    uuid = new_pull_uuid()
    expiry = datetime.datetime.now() + datetime.timedelta(seconds=self.ttl_s)
    self._server.await_pull(uuid, arrs, timeout=expiry)
    self.leases.put(dest.transfer_id, arrs, kv.nbytes)
    handle = handle_for(kv, self.name, dest.transfer_id)
    handle.transfer_address = self._advertise
    handle.pull_uuid = uuid
    handle.shards = shards
    handle.layer_shards = stages if stages > 1 else 0
    return handle

  def release(self, transfer_id: str) -> None:
    self.leases.pop(transfer_id)

  def reap(self) -> int:
    return self.leases.reap()

  def live(self) -> int:
    return len(self.leases)


class DeviceReceiver(IssuedKvReceiver):
  name = "device"

  def __init__(self, device, *, host: str = "127.0.0.1", connections: int = 4):
    self._server = _start_server(device, host, connections)
    self._conns: dict[str, object] = {}
    self._lock = threading.Lock()
    super().__init__()

  def _connection(self, address: str):
    with self._lock:
      conn = self._conns.get(address)
      if conn is None:
        conn = self._conns[address] = self._server.connect(address)
      return conn

  def receive(self, handle: kv_pb2.KvHandle, sharding: NamedSharding, *,
              timeout_s: float) -> RequestKV:
    self._issued.check(handle.transfer_id)
    dtype = jax.numpy.dtype(handle.dtype)
    shape = tuple(handle.shape)
    stages = handle.layer_shards
    if stages > 1:   # one array per pipeline stage, onto its first device
      stage_devices = stage_leaders(sharding, stages)
      part = (shape[0] // stages,) + shape[1:]
      specs = [jax.ShapeDtypeStruct(part, dtype,
                                    sharding=transfer_sharding([d], 1))
               for d in stage_devices]
    else:
      landing = transfer_sharding(_ordered_devices(sharding),
                                  max(handle.shards, 1))
      specs = [jax.ShapeDtypeStruct(shape, dtype, sharding=landing)]
    deadline = time.monotonic() + timeout_s
    try:
      arrs = self._connection(handle.transfer_address).pull(
          handle.pull_uuid, specs)
      for a in arrs:
        while not a.is_ready():
          if time.monotonic() > deadline:
            raise TransferTimeout(
                f"KV pull {handle.transfer_id} from "
                f"{handle.transfer_address} did not complete within "
                f"{timeout_s:.1f} s")
          time.sleep(0.0005)
      self.forget(handle.transfer_id)
      if stages > 1:
        arr = jax.make_array_from_single_device_arrays(
            shape, NamedSharding(Mesh(np.array(stage_devices, dtype=object),
                                      ("pp",)), PartitionSpec("pp")),
            [a.addressable_data(0) for a in arrs])
      else:
        (arr,) = arrs
      out = reshard_kv(RequestKV(arr, handle.num_tokens, handle.first_page),
                       sharding)
      out.kv.block_until_ready()
    except jax.errors.JaxRuntimeError as e:
      raise device_failure(e, f"KV pull {handle.transfer_id} from "
                           f"{handle.transfer_address}") from e
    return out


class BlockPulls:
  """Shared KV over ``jax.experimental.transfer`` (``pdjax.service.kvstore``
  ``PullBlocks``): a prefill worker offers a run of prefix blocks, stacked
  on one of its devices, for a peer to pull straight into its own devices,
  and pulls the runs its peers offer. Offered arrays are held (one owner:
  the lease table) until their TTL, whether pulled or not; the transfer
  server drops an unpulled registration at the same deadline."""

  def __init__(self, device, *, host: str = "127.0.0.1",
               advertise_host: str | None = None, ttl_s: float = 10.0,
               max_bytes: int = 1 << 30, connections: int = 2):
    """``max_bytes``: device memory offers may hold at once (past it an
    offer raises OverflowError: the peer computes instead)."""
    self.device = device
    self.ttl_s = ttl_s
    self.max_bytes = max_bytes
    self._server = _start_server(device, host, connections)
    self._advertise = _advertised(self._server.address(), advertise_host)
    self._offers: collections.deque = collections.deque()  # (deadline, arr)
    self._offered_bytes = 0
    self._conns: dict[str, object] = {}
    self._lock = threading.Lock()

  def address(self) -> str:
    return self._advertise

  def held_bytes(self) -> int:
    with self._lock:
      self._expire()
      return self._offered_bytes

  def _expire(self) -> None:
    now = time.monotonic()
    while self._offers and self._offers[0][0] < now:
      _, arr = self._offers.popleft()
      self._offered_bytes -= arr.nbytes

  def stack(self, blocks) -> jax.Array:
    """``blocks`` (arrays ``[2, L, P, K, hd]``, on devices or the host) as
    one array ``[n, 2, L, P, K, hd]`` on this server's device."""
    one = jax.sharding.SingleDeviceSharding(self.device)
    return jax.device_put(
        jax.numpy.stack([jax.device_put(b, one) for b in blocks]),
        transfer_sharding([self.device], 1))

  def offer(self, blocks) -> tuple[str, int]:
    """Stacks ``blocks`` (``stack``) and registers them for one pull;
    returns (transfer address, pull id)."""
    return self.offer_stacked(self.stack(blocks))

  def offer_stacked(self, arr: jax.Array) -> tuple[str, int]:
    """Registers a ``stack``ed run for one pull; returns (transfer address,
    pull id). OverflowError past ``max_bytes`` held."""
    with self._lock:
      self._expire()
      if self._offered_bytes + arr.nbytes > self.max_bytes:
        raise OverflowError(f"blocks offered to peers hold "
                            f"{self._offered_bytes} bytes; at most "
                            f"{self.max_bytes}")
      self._offers.append((time.monotonic() + self.ttl_s, arr))
      self._offered_bytes += arr.nbytes
    uuid = new_pull_uuid()
    expiry = datetime.datetime.now() + datetime.timedelta(seconds=self.ttl_s)
    self._server.await_pull(uuid, [arr], timeout=expiry)
    return self._advertise, uuid

  def pull(self, address: str, uuid: int, shape, dtype, *,
           timeout_s: float) -> jax.Array:
    """The array offered at ``address`` under ``uuid``, on this server's
    device (TransferTimeout past ``timeout_s``)."""
    with self._lock:
      conn = self._conns.get(address)
      if conn is None:
        conn = self._conns[address] = self._server.connect(address)
    spec = jax.ShapeDtypeStruct(tuple(shape), dtype,
                                sharding=transfer_sharding([self.device], 1))
    deadline = time.monotonic() + timeout_s
    try:
      (arr,) = conn.pull(uuid, [spec])
      while not arr.is_ready():
        if time.monotonic() > deadline:
          raise TransferTimeout(f"block pull from {address} did not "
                                f"complete within {timeout_s:.1f} s")
        time.sleep(0.0005)
    except jax.errors.JaxRuntimeError as e:
      raise device_failure(e, f"block pull from {address}") from e
    return arr


def _advertised(address: str, host: str | None) -> str:
  if not host:
    return address
  port = address.rsplit(":", 1)[1]
  return f"{host}:{port}"


__all__ = ["BlockPulls", "DeviceSender", "DeviceReceiver", "kv_head_shards",
           "layer_groups", "stage_leaders", "transfer_sharding"]
