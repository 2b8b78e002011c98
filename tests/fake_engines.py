"""Engines that stand in for the real ones behind the services' seams
(``pdjax.engine.api``), so a servicer's logic is tested in milliseconds,
without JAX programs."""

from __future__ import annotations

import types


class FakePrefillEngine:
  """A ``PrefillBackend`` whose ``prefill`` each test scripts: nothing
  cached, no devices to report memory of, nothing to close."""
  cfg = types.SimpleNamespace(vocab_size=1000)
  config = types.SimpleNamespace(max_batch=2, max_seq_len=1024)
  prefix_store = None
  mesh = types.SimpleNamespace(local_devices=[])   # no memory gauges

  def prefill(self, requests, *, kv_ready=None, on_result=None):
    raise NotImplementedError("each test scripts its engine's prefill")

  def close(self) -> None:
    pass
