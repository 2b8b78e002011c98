"""How a local deployment hands GPUs to its workers, how much of each
GPU's memory a worker gives XLA (no GPU needed: only the environment each
worker would start with is checked), the address a worker's KV
transfer server is advertised at, and the ports a restarted process
serves on."""

import pytest

from pdjax.launch.cluster import (GpuAssignment, GpuWorker, LocalCluster,
                                  UsageError, assign_gpus, machine_gpus,
                                  visible_gpus)


def _assign(visible, sizes, fractions=None, monkeypatch=None, tmp_path=None):
  """Each worker's CUDA_VISIBLE_DEVICES and flags, as the cluster starts
  it, for workers of ``sizes`` GPUs with the launcher's ``visible``."""
  if visible is None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
  else:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
  fractions = fractions or [None] * len(sizes)
  cluster = LocalCluster(tmp_path, platform="gpu")
  cluster.assign([GpuWorker(f"w{i}", n, f)
                  for i, (n, f) in enumerate(zip(sizes, fractions))])
  out = []
  for i in range(len(sizes)):
    env = cluster._env(sizes[i], f"w{i}")
    assert env["JAX_PLATFORMS"] == "cuda"    # never a silent CPU fallback
    out.append((env["CUDA_VISIBLE_DEVICES"], cluster.gpu_flags(f"w{i}")))
  return out


def test_workers_get_the_launchers_visible_gpus(tmp_path, monkeypatch):
  # Two deployments on one host: the second one launched with GPUs 2 and 3.
  assert _assign("2,3", [1, 1], monkeypatch=monkeypatch,
                 tmp_path=tmp_path) == [("2", []), ("3", [])]
  assert _assign("GPU-a, GPU-b,GPU-c", [2, 1], monkeypatch=monkeypatch,
                 tmp_path=tmp_path) == [("GPU-a,GPU-b", []), ("GPU-c", [])]


def test_without_cuda_visible_devices_the_driver_lists_the_gpus(
    tmp_path, monkeypatch):
  import subprocess
  listing = ("GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-x)\n"
             "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-y)\n")
  monkeypatch.setattr(subprocess, "run", lambda *a, **k:
                      subprocess.CompletedProcess(a, 0, listing, ""))
  assert machine_gpus(None) == ["0", "1"]
  assert _assign(None, [1, 1], monkeypatch=monkeypatch,
                 tmp_path=tmp_path) == [("0", []), ("1", [])]


def test_one_gpu_is_shared_with_the_deployments_memory_split(tmp_path,
                                                              monkeypatch):
  """Prefill and decode on one card: each takes its pool's share; one
  with none set splits what is left."""
  assert _assign("0", [1, 1], [0.35, 0.55], monkeypatch=monkeypatch,
                 tmp_path=tmp_path) == [
                     ("0", ["--gpu_memory_fraction=0.35"]),
                     ("0", ["--gpu_memory_fraction=0.55"])]
  got = _assign("0", [1, 1, 1], [0.35, None, None],
                monkeypatch=monkeypatch, tmp_path=tmp_path)
  assert [g for g, _ in got] == ["0", "0", "0"]
  assert [f for _, f in got] == [["--gpu_memory_fraction=0.35"],
                                 ["--gpu_memory_fraction=0.3"],
                                 ["--gpu_memory_fraction=0.3"]]
  # A TP=2 prefill and a decode worker on two cards: the decode worker
  # shares card 0 with half of the prefill mesh; card 1 is the prefill's.
  got = assign_gpus([GpuWorker("p", 2, 0.4), GpuWorker("d", 1, 0.5)],
                    ["0", "1"])
  assert got == {"p": GpuAssignment(("0", "1"), 0.4),
                 "d": GpuAssignment(("0",), 0.5)}


def test_a_prefill_sharing_a_card_with_decode_runs_one_program(
    tmp_path, monkeypatch):
  """On a card a decode worker shares, the prefill worker's prompts run in
  one program (layer groups overlap nothing within a card); on cards of
  its own, and when the caller says otherwise, it keeps its setting."""
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
  one = LocalCluster(tmp_path, platform="gpu")
  one.assign([GpuWorker("prefill0", 1, 0.3), GpuWorker("decode0", 1, 0.6)])
  assert one.prefill_flags("prefill0", ["decode0"]) == [
      "--prefill_layer_groups=1"]
  assert one.prefill_flags("prefill0", ["decode0"],
                           ["--prefill_layer_groups=4"]) == []
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
  two = LocalCluster(tmp_path, platform="gpu")
  two.assign([GpuWorker("prefill0", 1), GpuWorker("decode0", 1)])
  assert two.prefill_flags("prefill0", ["decode0"]) == []
  assert LocalCluster(tmp_path).prefill_flags("prefill0", ["decode0"]) == []


def test_what_cannot_be_placed_is_a_usage_error():
  with pytest.raises(UsageError, match="needs 2 GPUs for its mesh"):
    assign_gpus([GpuWorker("prefill0", 2)], ["0"])
  with pytest.raises(UsageError, match=r"add up to more than 0\.95"):
    assign_gpus([GpuWorker("prefill0", 1, 0.85),
                 GpuWorker("decode0", 1, 0.85)], ["0"])
  with pytest.raises(UsageError, match="no GPU is visible"):
    assign_gpus([GpuWorker("decode0", 1)], [])
  assert assign_gpus([], []) == {}


def test_visible_gpus_parsing():
  assert visible_gpus(None) is None
  assert visible_gpus("") == []
  assert visible_gpus("1, 3") == ["1", "3"]


def test_the_router_takes_no_gpu(tmp_path, monkeypatch):
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
  cluster = LocalCluster(tmp_path, platform="gpu")
  cluster.assign([GpuWorker("decode0", 1)])
  router = cluster._env(0)
  assert (router["CUDA_VISIBLE_DEVICES"], router["JAX_PLATFORMS"]) == ("",
                                                                       "cpu")
  assert cluster._env(1, "decode0")["CUDA_VISIBLE_DEVICES"] == "2"


def test_a_worker_that_cannot_see_its_gpu_fails_at_start(tmp_path):
  """A worker started for a GPU it cannot see (here: none at all) stops
  before loading anything, with a message that names the problem, instead
  of running on the CPU."""
  import os
  import subprocess
  import sys
  env = dict(os.environ, JAX_PLATFORMS="cuda", CUDA_VISIBLE_DEVICES="1")
  p = subprocess.run(
      [sys.executable, "-m", "pdjax.launch.decode", "--config=test",
       f"--port_file={tmp_path / 'port'}"], env=env, capture_output=True,
      text=True, timeout=120)
  assert p.returncode != 0
  assert "cannot use the GPU it was started for" in p.stderr, p.stderr
  assert "CUDA_VISIBLE_DEVICES=1" in p.stderr
  assert "Traceback" not in p.stderr
  assert not (tmp_path / "port").exists()


def test_gpu_memory_fraction_becomes_xlas_setting():
  from absl import app
  from pdjax.launch.worker import xla_memory_env
  assert xla_memory_env(None) == {}
  assert xla_memory_env(0.9) == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9"}
  for bad in (0.0, 1.5, -0.1):
    with pytest.raises(app.UsageError, match="gpu_memory_fraction"):
      xla_memory_env(bad)


def test_the_gil_switch_interval_is_set_in_milliseconds():
  import sys
  from absl import app
  from pdjax.launch.worker import set_switch_interval
  before = sys.getswitchinterval()
  try:
    set_switch_interval(0.5)
    assert sys.getswitchinterval() == pytest.approx(0.0005)
    for bad in (0.0, -1.0):
      with pytest.raises(app.UsageError, match="gil_switch_interval_ms"):
        set_switch_interval(bad)
  finally:
    sys.setswitchinterval(before)


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


def test_prompt_goes_through_the_models_chat_template(tiny_model_dir):
  """``launch.local --prompt`` sends the text as a user message rendered
  with the model's template; a model without one gets the text as is."""
  from pdjax.launch.cluster import chat_prompt
  text, origin = chat_prompt("test", None, "Hi there")
  assert text == "<|bos|>User: Hi there\nAssistant:"
  assert origin.endswith("tokenizer_config.json")
  assert chat_prompt("test", "random:tiny", "Hi") is None


def test_a_restart_serves_on_the_ports_it_served_on(tmp_path, monkeypatch):
  """A restarted process gets the ports it had, the router's HTTP port
  (--http_port) too, whatever it was started with (0: any free one)."""
  import json

  from pdjax.launch.cluster import Proc
  cluster = LocalCluster(tmp_path)
  started = []
  monkeypatch.setattr(cluster, "_popen",
                      lambda name, module, args, *a, **k: started.append(
                          list(args)))
  p = Proc("router", None, tmp_path / "router.port", tmp_path / "router.log",
           module="pdjax.launch.router", devices=0,
           args=["--config=test", "--port=0", "--http_port=0"])
  p.port_file.write_text(json.dumps(
      {"port": 5001, "metrics_port": -1, "http_port": 8001}))
  cluster.restart(p)
  assert started[-1] == ["--config=test", "--port=5001", "--http_port=8001"]
  # Gone before it wrote its ports again: the last ones it served on.
  cluster.restart(p)
  assert started[-1] == ["--config=test", "--port=5001", "--http_port=8001"]
