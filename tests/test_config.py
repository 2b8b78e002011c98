"""The deployment configuration and the launchers' flags.

One typed value per deployment (``pdjax.config``): every packaged file
resolves and survives a round trip through ``to_toml``; each setting has
one default, the engine config's where the engine reads it; unknown keys
and wrong types are refused naming the file and the key. Flags are
generated from the same fields (``pdjax.launch.config_flags``) and each
launcher defines only those it reads; a worker resolves its pool flags
(``--mesh`` and the like) onto the pool(s) it serves, a ``--role=both``
worker included.
"""

from __future__ import annotations

import dataclasses
import importlib

import pytest
from absl import app, flags

from pdjax import config as C
from pdjax import resources
from pdjax.engine.decode_config import DecodeConfig
from pdjax.engine.prefill import PrefillConfig
from pdjax.service.router import RouterConfig


# ---------------------------------------------------------------- files
@pytest.mark.parametrize("name", resources.names("deployment"))
def test_packaged_deployments_resolve_and_round_trip(name, tmp_path):
  dep = C.resolve(name)
  path = tmp_path / "resolved.toml"
  path.write_text(dep.to_toml())
  assert C.resolve(path) == dep
  assert C.resolve(str(path)) == dep           # a path given as text
  assert dep.router.kv_transport == dep.kv_transport


def test_one_default_per_setting():
  """The pool tables take the engines' defaults: a deployment that sets
  nothing runs the engine configs' own values."""
  shared = {"page_size", "max_seq_len", "kv_dtype"}
  prefill, decode = C.PrefillPoolConfig(), C.DecodePoolConfig()
  for f in dataclasses.fields(PrefillConfig):
    if f.name in shared or f.name == "layer_groups":   # resolved per worker
      continue
    assert getattr(prefill, f.name) == f.default, f.name
  for f in dataclasses.fields(DecodeConfig):
    if f.name not in shared:
      assert getattr(decode, f.name) == f.default, f.name
  for name in ("buckets", "max_batch", "max_batch_tokens"):
    assert getattr(decode, name) == getattr(PrefillConfig(), name), name
  dep = C.DeploymentConfig()
  assert dep.prefill_engine_config() == PrefillConfig()
  assert dep.decode_engine_config() == DecodeConfig()
  assert dep.router == RouterConfig()
  assert (dep.page_size, dep.max_seq_len) == (DecodeConfig.page_size,
                                              DecodeConfig.max_seq_len)
  assert dep.kv_dtype == DecodeConfig.kv_dtype == PrefillConfig.kv_dtype


def test_files_and_overrides_are_checked(tmp_path):
  bad = tmp_path / "bad.toml"
  cases = [
      ("[prefill]\nbucket = [32]\n", "unknown keys in [prefill]: ['bucket']"),
      ("[decode]\nmax_seqs = \"8\"\n", "[decode] max_seqs: expected an "
       "integer"),
      ("[router]\nkv_transport = \"grpc\"\n", "unknown keys in [router]"),
      ("[router]\non_full = \"drop\"\n", "[router] on_full: 'drop' is not "
       "one of queue, reject"),
      ("kv_transport = \"ipc\"\n", "kv_transport: 'ipc' is not one of"),
      ("page_sizes = 16\n", "unknown key 'page_sizes'"),
      ("[prefill]\nbuckets = [24]\n", "bucket 24 is not a multiple of "
       "page_size 16"),
      ("[decode]\nmesh = \"dp\"\n", "mesh 'dp'"),
      ("[router]\npoll_interval_s = 0\n", "poll_interval_s must be > 0"),
      ("[router]\nkv_overlap_weight = 1\npoll_interval_s = 3\n",
       "poll_interval_s (3) must be shorter than kv_stale_after_s (2)"),
  ]
  for text, message in cases:
    bad.write_text(text)
    with pytest.raises(ValueError) as e:
      C.resolve(bad)
    assert str(bad) in str(e.value) and message in str(e.value), e.value
  with pytest.raises(ValueError, match=r"flags: \[prefill\] buckets: "
                     "expected a list of integers"):
    C.resolve("test", {"prefill": {"buckets": ["32", "x"]}})
  with pytest.raises(FileNotFoundError, match="packaged names.*local"):
    C.resolve("no-such-deployment")


def test_overrides_apply_over_the_file():
  dep = C.resolve("test", {"kv_transport": "local", "max_seq_len": 512,
                           "prefill": {"mesh": "tp=1", "buckets": ["32"]},
                           "router": {"max_inflight": 7}})
  assert (dep.kv_transport, dep.max_seq_len) == ("local", 512)
  assert dep.prefill.mesh == "tp=1" and dep.prefill.buckets == (32,)
  assert dep.prefill.max_batch == 2                      # the file's
  assert dep.router.max_inflight == 7
  assert dep.router.kv_transport == "local"              # the deployment's
  assert dep.decode_engine_config().max_seq_len == 512


# ---------------------------------------------------------------- flags
def _flags(module: str, argv=None) -> tuple[flags.FlagValues, object]:
  """A launcher's flags, defined on their own FlagValues (and parsed, when
  ``argv`` is given)."""
  fv = flags.FlagValues()
  cfg = importlib.import_module(module).define_flags(fv)
  if argv is not None:
    fv(["prog", *argv])
  return fv, cfg


def test_each_launcher_defines_only_what_it_reads():
  names = {m: frozenset(_flags(f"pdjax.launch.{m}")[0])
           for m in ("prefill", "decode", "worker", "router", "gateway",
                     "local")}
  worker_only = {"ipc_landing_buffers", "fault_injection_drop_kv",
                 "fault_injection_decode_step_delay_s", "kv_ttl_s",
                 "mesh", "devices", "coordinator_address"}
  assert not worker_only & names["router"]
  assert not worker_only & names["gateway"]
  assert not {"tls_mtls", "service_token", "metrics_port",
              "max_message_bytes", "kv_transport"} & names["gateway"]
  assert {"tls_ca", "tls_cert", "auth_token", "router"} <= names["gateway"]
  assert not {n for n in names["prefill"] if n.startswith("decode_")}
  assert "ipc_landing_buffers" not in names["prefill"]
  assert "fault_injection_drop_kv" not in names["decode"]
  # A decode worker reads one prefill setting: the KV sizes it may get.
  assert {n for n in names["decode"] if n.startswith("prefill_")} == {
      "prefill_buckets"}
  assert {"prefill_mesh", "decode_mesh", "max_inflight",
          "decode_max_seqs"} <= names["local"]
  # Shared KV: the store's address is a prefill worker's, the stores the
  # router polls and the fetch weight the router's.
  assert {"kv_store", "kv_fetch", "prefill_kv_fetch"} <= names["prefill"]
  assert not {"kv_store", "kv_fetch"} & names["decode"]
  assert {"kv_stores", "kv_fetch_weight"} <= names["router"]
  assert not {"kv_store", "kv_fetch", "kv_stores"} & names["gateway"]
  assert "ipc_landing_buffers" not in names["local"]
  assert names["worker"] >= names["prefill"] | names["decode"]


def test_flags_are_typed_by_their_fields():
  fv, cfg = _flags("pdjax.launch.local", [
      "--decode_max_seqs=32", "--prefill_buckets=16,64",
      "--nodecode_prefix_caching", "--on_full=reject", "--dtype=bfloat16",
      "--decode_gpu_memory_fraction=0.5"])
  assert cfg.overrides() == {
      "dtype": "bfloat16", "decode": {"max_seqs": 32, "prefix_caching": False,
                                      "gpu_memory_fraction": 0.5},
      "prefill": {"buckets": ["16", "64"]}, "router": {"on_full": "reject"}}
  dep = cfg.resolve(log_it=False)
  assert dep.prefill.buckets == (16, 64) and dep.decode.max_seqs == 32
  for argv in (["--decode_max_seqs=x"], ["--on_full=drop"],
               ["--kv_transport=ipc"]):
    with pytest.raises(flags.IllegalFlagValueError):
      _flags("pdjax.launch.local", argv)
  # An unset flag leaves the file alone, and help says whose default.
  fv, cfg = _flags("pdjax.launch.router", [])
  assert cfg.overrides() == {}
  assert "else 4096" in fv["max_inflight"].help


def _worker(role: str, module: str, argv):
  from pdjax.launch import worker
  fv, cfg = _flags(module, ["--config=test", *argv])
  return worker.worker_config(role, cfg, fv)


def test_a_both_worker_takes_each_pools_mesh():
  """``--role=both`` runs the meshes it is given (it used to run the
  file's, whatever the flags said), and refuses ``--mesh``, which would
  not say which pool it means."""
  dep = _worker("both", "pdjax.launch.worker",
                ["--prefill_mesh=tp=1", "--decode_mesh=dp=2"])
  assert (dep.prefill.mesh, dep.decode.mesh) == ("tp=1", "dp=2")
  with pytest.raises(app.UsageError, match="--prefill_mesh and "
                     "--decode_mesh"):
    _worker("both", "pdjax.launch.worker", ["--mesh=tp=1"])
  both = _worker("both", "pdjax.launch.worker",
                 ["--gpu_memory_fraction=0.4", "--host_cache_blocks=8",
                  "--kv_ttl_s=5", "--decode_max_queue=3"])
  for pool in (both.prefill, both.decode):
    assert pool.gpu_memory_fraction == 0.4 and pool.host_cache_blocks == 8
    assert pool.kv_ttl_s == 5.0
  assert (both.prefill.max_queue, both.decode.max_queue) == (
      C.MAX_QUEUE, 3)


def test_a_worker_resolves_its_pool_flags():
  dep = _worker("prefill", "pdjax.launch.prefill", [
      "--mesh=tp=1", "--sharding=prefill_tp", "--prefix_cache_pages=64",
      "--prefill_layer_groups=2"])
  assert dep.prefill.mesh == "tp=1" and dep.prefill.cache_pages == 64
  assert dep.prefill.layer_groups == 2
  assert dep.decode == C.resolve("test").decode          # not this worker's
  dep = _worker("decode", "pdjax.launch.decode", [
      "--mesh=dp=2", "--prefix_caching", "--max_receive_mib=64",
      "--prefill_buckets=32", "--ipc_landing_buffers=4",
      "--transfer_timeout_s=2"])
  assert dep.decode.mesh == "dp=2" and dep.decode.prefix_caching
  assert dep.decode.max_receive_mib == 64
  assert dep.decode.ipc_landing_buffers == 4
  assert dep.decode.transfer_timeout_s == 2.0
  assert dep.prefill_engine_config().buckets == (32,)
  with pytest.raises(app.UsageError, match="disagree"):
    _worker("decode", "pdjax.launch.decode",
            ["--mesh=dp=2", "--decode_mesh=dp=1"])
  with pytest.raises(app.UsageError, match="does not read --decode_max_seqs"):
    _worker("prefill", "pdjax.launch.worker", ["--decode_max_seqs=4"])
  with pytest.raises(SystemExit, match="is not a multiple of page_size"):
    _worker("prefill", "pdjax.launch.prefill", ["--prefill_buckets=20"])
  with pytest.raises(SystemExit, match="kv_ttl_s must be > 0"):
    _worker("prefill", "pdjax.launch.prefill", ["--kv_ttl_s=0"])


def test_local_launch_routes_worker_flags_by_launcher():
  from pdjax.launch.cluster import flags_for
  extra = ["--prefix_cache_pages=64", "--prefix_caching", "--kv_ttl_s=5",
           "--noprefix_caching", "--ipc_landing_buffers=4",
           "--fault_injection_drop_kv=0.5", "--metrics_port=0"]
  assert flags_for("pdjax.launch.prefill", extra) == [
      "--prefix_cache_pages=64", "--kv_ttl_s=5",
      "--fault_injection_drop_kv=0.5", "--metrics_port=0"]
  assert flags_for("pdjax.launch.decode", extra) == [
      "--prefix_caching", "--kv_ttl_s=5", "--noprefix_caching",
      "--ipc_landing_buffers=4", "--metrics_port=0"]
  assert flags_for("pdjax.launch.worker", extra) == extra


def test_local_launch_writes_the_one_configuration(tmp_path):
  """What every process of a local deployment is given: the file with the
  launcher's settings on top, written once."""
  from pdjax.launch.cluster import LocalCluster, UsageError, launch
  from pdjax.launch.cluster import resolve_deployment
  dep = resolve_deployment("test", {"decode": {"max_seqs": 4,
                                               "row_buckets": [4]}},
                           kv_transport="local", prefill_mesh="tp=1",
                           local_prefill_threshold=8)
  assert dep.kv_transport == "local" and dep.prefill.mesh == "tp=1"
  assert dep.decode.max_seqs == 4
  assert dep.router.local_prefill_threshold == 8
  cluster = LocalCluster(tmp_path)
  assert C.resolve(cluster.write_config(dep)) == dep
  with pytest.raises(UsageError, match="bucket"):
    resolve_deployment("test", {"prefill": {"buckets": [20]}})
  with pytest.raises(UsageError, match="row bucket 16"):
    resolve_deployment("test", {"decode": {"max_seqs": 4}})
  with pytest.raises(UsageError, match="no worker of this deployment reads"):
    launch(cluster, config="test", num_prefill=0,
           worker_flags=["--fault_injection_drop_kv=0.5"])
  assert not cluster.procs
