"""How a local deployment hands GPUs to its workers, how much of each
GPU's memory a worker gives XLA (no GPU needed: only the environment each
worker would start with is checked), and the address a worker's KV
transfer server is advertised at."""

import pytest

from pdjax.launch.cluster import LocalCluster, UsageError, visible_gpus


def _gpu_envs(tmp_path, monkeypatch, visible, sizes):
  if visible is None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
  else:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
  cluster = LocalCluster(tmp_path, platform="gpu")
  return [cluster._env(n)["CUDA_VISIBLE_DEVICES"] for n in sizes]


def test_workers_get_consecutive_gpus_from_zero(tmp_path, monkeypatch):
  assert _gpu_envs(tmp_path, monkeypatch, None, [2, 1, 1]) == ["0,1", "2",
                                                                "3"]


def test_workers_get_the_launchers_visible_gpus(tmp_path, monkeypatch):
  # Two deployments on one host: the second one launched with GPUs 2 and 3.
  assert _gpu_envs(tmp_path, monkeypatch, "2,3", [1, 1]) == ["2", "3"]
  assert _gpu_envs(tmp_path, monkeypatch, "GPU-a, GPU-b,GPU-c",
                   [2, 1]) == ["GPU-a,GPU-b", "GPU-c"]


def test_more_gpus_than_visible_is_a_usage_error(tmp_path, monkeypatch):
  with pytest.raises(UsageError, match="CUDA_VISIBLE_DEVICES=4,5"):
    _gpu_envs(tmp_path, monkeypatch, "4,5", [2, 1])


def test_visible_gpus_parsing():
  assert visible_gpus(None) is None
  assert visible_gpus("") == []
  assert visible_gpus("1, 3") == ["1", "3"]


def test_the_router_takes_no_gpu(tmp_path, monkeypatch):
  # devices=0 (the router) between two workers: it takes none of their GPUs.
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
  cluster = LocalCluster(tmp_path, platform="gpu")
  first = cluster._env(1)
  router = cluster._env(0)
  assert (router["CUDA_VISIBLE_DEVICES"], router["JAX_PLATFORMS"]) == ("",
                                                                       "cpu")
  assert (first["CUDA_VISIBLE_DEVICES"],
          cluster._env(1)["CUDA_VISIBLE_DEVICES"]) == ("2", "3")


def test_gpu_memory_fraction_becomes_xlas_setting():
  from absl import app
  from pdjax.launch.worker import xla_memory_env
  assert xla_memory_env(None) == {}
  assert xla_memory_env(0.9) == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9"}
  for bad in (0.0, 1.5, -0.1):
    with pytest.raises(app.UsageError, match="gpu_memory_fraction"):
      xla_memory_env(bad)


def test_device_transfer_server_is_advertised_at_the_workers_address():
  """A worker bound to 0.0.0.0 (a Kubernetes pod) tells decode workers to
  pull its KVs from its --advertise_address host, not from 0.0.0.0."""
  import jax
  from pdjax.launch.worker import advertised_host
  from pdjax.transfer.device import DeviceSender
  assert advertised_host(None) is None
  assert advertised_host("10.4.0.7:50061") == "10.4.0.7"
  assert advertised_host("[fd00::7]:50061") == "[fd00::7]"
  sender = DeviceSender(jax.devices()[0], host="0.0.0.0",
                        advertise_host=advertised_host("10.4.0.7:50061"))
  host, port = sender.address().rsplit(":", 1)
  assert host == "10.4.0.7" and int(port) > 0
