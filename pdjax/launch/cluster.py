"""Processes of a local deployment: start, wait until serving, supervise,
stop.

``LocalCluster`` is what ``python -m pdjax.launch.local`` (``pdjax serve``)
and the end-to-end tests use to run router + prefill + decode workers as
separate processes on this machine. It defines no flags, so tests and tools
can import it freely.

``launch`` resolves the deployment once (the file, then the caller's
overrides: meshes, transport, any ``[prefill]``/``[decode]``/``[router]``
key) and writes the result to the run folder as ``deployment.toml``, which
every process it starts is given as ``--config``: the workers, the router
and the gateway run one configuration, a ``--role=both`` worker included.
Extra per-process flags (``worker_flags``) go to each worker whose
launcher defines them (``--prefix_caching`` to decode workers,
``--fault_injection_drop_kv`` to prefill workers); one that no launcher
started defines is refused.

Supervision. Every process it starts dies with it: the child asks the kernel
for a parent-death signal (``prctl(PR_SET_PDEATHSIG, SIGTERM)``, Linux) first
thing after exec (``pdjax.launch.child`` runs the module), so a launcher
killed with SIGKILL, or one whose terminal went away, leaves no worker
running and holding its port (they drain and exit as on any SIGTERM); each
child also runs in a process group of its own that ``stop`` signals as a
whole. The signal follows the *thread* that
started the child, so processes are only ever started from one long-lived
thread (the launcher's main thread). ``Supervisor`` watches the processes:
one that exits while it was not being stopped is started again with the
same arguments on the same port (the router keeps dialling that address, a
registering worker registers again, a restarted router is found again by
its workers), with a growing back-off; one that keeps dying (``max_restarts``
within ``restart_window_s``) ends the deployment with ``ProcessFailed``,
which says which process, its exit status and its log's last line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from pdjax.launch.child import PARENT_ENV
from pdjax.mesh_spec import mesh_size


class UsageError(ValueError):
  """A deployment that cannot be launched as asked."""


class ProcessFailed(RuntimeError):
  """A process of the deployment failed for good (at start, or restarted
  too often); ``str()`` is one line for the launcher to print."""

  def __init__(self, message: str, name: str = "", code: int | None = None):
    super().__init__(message)
    self.name = name
    self.code = code


@dataclasses.dataclass(eq=False)
class Proc:
  name: str
  popen: subprocess.Popen
  port_file: Path
  log: Path
  # How it was started (``restart`` starts it again the same way).
  module: str = ""
  args: list = dataclasses.field(default_factory=list)
  devices: int = 1
  role: str = ""                 # "router" | "prefill" | "decode" | ...
  stopping: bool = False         # being stopped on purpose: not restarted
  restarts: list = dataclasses.field(default_factory=list)  # when (monotonic)
  last_port: int | None = None
  last_http_port: int | None = None
  # Processes of one jax.distributed job: restarted together.
  group: list | None = None

  def ports(self) -> dict | None:
    try:
      return json.loads(self.port_file.read_text())
    except FileNotFoundError:
      return None

  def port(self) -> int | None:
    p = self.ports()
    return None if p is None else p["port"]

  @property
  def metrics_port(self) -> int | None:
    p = self.ports()
    return None if p is None else p.get("metrics_port")

  @property
  def http_port(self) -> int | None:
    """Where it serves HTTP too (a router started with --http_port)."""
    p = self.ports()
    return None if p is None else p.get("http_port")


# Share of a GPU the processes on it may take together when a deployment
# shares cards: the rest is the CUDA contexts' and the CUDA IPC buffers'.
SHARED_GPU_BUDGET = 0.95


@dataclasses.dataclass(frozen=True)
class GpuWorker:
  """A process of a deployment that wants GPUs: how many, and the share of
  each card its pool's settings give it (None: none set)."""
  name: str
  devices: int
  memory_fraction: float | None = None


@dataclasses.dataclass(frozen=True)
class GpuAssignment:
  """The GPUs of one process (its CUDA_VISIBLE_DEVICES) and, where cards
  are shared, the share of each it may take (None: its own setting)."""
  gpus: tuple[str, ...]
  memory_fraction: float | None = None


def assign_gpus(workers: list[GpuWorker], gpus: list[str]
                ) -> dict[str, GpuAssignment]:
  """Places a deployment's processes on ``gpus``.

  One card each where there are enough (the workers' own memory settings
  apply). Otherwise the processes share cards, each taking the next of
  its mesh's size in turn (a prefill and a decode worker on a one-GPU
  machine share it): on a shared card the processes' memory shares must
  add up to at most ``SHARED_GPU_BUDGET``; what the pools' settings leave
  is split evenly between the processes that set none. Raises UsageError
  when a mesh wants more GPUs than there are, or the shares set do not fit.
  """
  if not workers:
    return {}
  if not gpus:
    raise UsageError("--platform=gpu but no GPU is visible (nvidia-smi -L "
                     "lists none, or CUDA_VISIBLE_DEVICES is empty)")
  need = sum(w.devices for w in workers)
  for w in workers:
    if w.devices > len(gpus):
      raise UsageError(
          f"{w.name} needs {w.devices} GPUs for its mesh and this machine "
          f"shows {len(gpus)} ({','.join(gpus)}); ask for a smaller mesh")
  if need <= len(gpus):
    out, k = {}, 0
    for w in workers:
      out[w.name] = GpuAssignment(tuple(gpus[k:k + w.devices]))
      k += w.devices
    return out
  placed, k = {}, 0
  for w in workers:
    placed[w.name] = tuple(gpus[(k + i) % len(gpus)]
                           for i in range(w.devices))
    k += w.devices
  fraction: dict[str, float] = {}
  for card in gpus:
    on = [w for w in workers if card in placed[w.name]]
    if not on:
      continue
    fixed = sum(w.memory_fraction for w in on
                if w.memory_fraction is not None)
    free = [w for w in on if w.memory_fraction is None]
    if fixed > SHARED_GPU_BUDGET or (free and fixed >= SHARED_GPU_BUDGET):
      shares = ", ".join(f"{w.name} {w.memory_fraction}" for w in on
                         if w.memory_fraction is not None)
      raise UsageError(
          f"GPU {card} is shared by {', '.join(w.name for w in on)} "
          f"(the deployment needs {need} GPUs, {len(gpus)} visible), but "
          f"their pools' gpu_memory_fraction ({shares}) add up to more than "
          f"{SHARED_GPU_BUDGET}; set [prefill]/[decode] gpu_memory_fraction "
          "to fit one card (the gpu-8b-1gpu deployment does)")
    for w in on:
      share = (w.memory_fraction if w.memory_fraction is not None
               else (SHARED_GPU_BUDGET - fixed) / len(free))
      fraction[w.name] = min(fraction.get(w.name, 1.0), share)
  return {w.name: GpuAssignment(placed[w.name], round(fraction[w.name], 4))
          for w in workers}


def machine_gpus(env_setting: str | None) -> list[str]:
  """The GPUs a local deployment may use: ``CUDA_VISIBLE_DEVICES`` when
  set (every CUDA program honours it, so two deployments can share a host
  on disjoint GPUs), else the driver's list (``nvidia-smi -L``), else
  none."""
  listed = visible_gpus(env_setting)
  if listed is not None:
    return listed
  try:
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return []
  return [str(i) for i, line in enumerate(
      ln for ln in out.splitlines() if ln.startswith("GPU "))]


class LocalCluster:
  """The processes of one local deployment, started and stopped together.
  On GPUs, ``assign`` places the processes on cards before they start."""

  def __init__(self, run_dir: Path, platform: str = "cpu",
               host: str = "127.0.0.1"):
    self.run_dir = Path(run_dir)
    self.run_dir.mkdir(parents=True, exist_ok=True)
    self.platform = platform
    self.host = host
    self.procs: list[Proc] = []
    self.gpus: dict[str, GpuAssignment] = {}
    # The resolved deployment every process runs (``write_config``).
    self.config_path: Path | None = None
    # The deployment's internal credential (--service_token), handed to
    # every process it starts through the environment (out of `ps`): one
    # per deployment unless the caller's environment names one.
    self.service_token = (os.environ.get("PDJAX_SERVICE_TOKEN")
                          or secrets.token_urlsafe(32))
    # Elastic deployments (``launch(elastic=True)``): the router's address
    # and how to start one more worker of each pool (``spawn_worker``).
    self.router_address: str | None = None
    self.worker_specs: dict[str, tuple[str, list[str], int]] = {}
    self._serial: dict[str, int] = {}

  def write_config(self, dep) -> Path:
    """Writes the deployment's resolved configuration for its processes."""
    path = self.run_dir / "deployment.toml"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(dep.to_toml())
    tmp.replace(path)
    self.config_path = path
    return path

  def assign(self, workers: list[GpuWorker]) -> None:
    """Places the GPU processes about to start (no-op off GPUs)."""
    if self.platform == "gpu":
      self.gpus = assign_gpus(
          workers, machine_gpus(os.environ.get("CUDA_VISIBLE_DEVICES")))

  def share_a_card(self, name: str, others: list[str]) -> bool:
    """Whether process ``name`` shares a GPU with any of ``others``."""
    mine = set(self.gpus[name].gpus) if name in self.gpus else set()
    return any(mine & set(self.gpus[o].gpus) for o in others
               if o in self.gpus)

  def prefill_flags(self, name: str, decode_names: list[str],
                    worker_flags=()) -> list[str]:
    """Settings a prefill process takes from where it was placed: on a card
    a decode worker shares, its prompts run in one program, not in layer
    groups (the groups let the hand-off copy overlap the prefill across a
    link; within a card the copy is a small part of a millisecond and the
    groups' extra programs cost more: 27.8 against 18.9 ms for 512 tokens
    of 8B on an H100). A ``--prefill_layer_groups`` of the caller's wins."""
    if any(f.lstrip("-").startswith("prefill_layer_groups")
           for f in worker_flags):
      return []
    if self.share_a_card(name, decode_names):
      return ["--prefill_layer_groups=1"]
    return []

  def gpu_flags(self, name: str) -> list[str]:
    """The flags that give a process its share of a shared card."""
    a = self.gpus.get(name)
    if a is None or a.memory_fraction is None:
      return []
    return [f"--gpu_memory_fraction={a.memory_fraction}"]

  def _env(self, devices: int, name: str = "") -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["PDJAX_SERVICE_TOKEN"] = self.service_token
    # Every worker of a deployment compiles the same programs, and so does
    # every restart: share XLA's persistent compilation cache.
    cache_root = os.path.expanduser(os.environ.get("PDJAX_CACHE",
                                                   "~/.cache/pdjax"))
    env.setdefault("JAX_COMPILATION_CACHE_DIR",
                   os.path.join(cache_root, "jax_compilation_cache"))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    if devices == 0:             # the router: no accelerator of its own
      env["JAX_PLATFORMS"] = "cpu"
      if self.platform != "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif self.platform == "cpu":
      env["JAX_PLATFORMS"] = "cpu"
      flag = f"--xla_force_host_platform_device_count={devices}"
      env["XLA_FLAGS"] = " ".join(
          [f for f in env.get("XLA_FLAGS", "").split()
           if "force_host_platform_device_count" not in f] + [flag])
    else:
      if name not in self.gpus:
        raise UsageError(f"{name} was not placed on a GPU (call assign "
                         "with every GPU process first)")
      env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus[name].gpus)
      # A worker asked to run on GPUs runs there or fails at start, never
      # on the CPU (launch.worker says what it could not see).
      env["JAX_PLATFORMS"] = "cuda"
      env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
      for k, v in (("NCCL_NVLS_ENABLE", "0"),
                   ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                   ("NVSHMEM_DISABLE_NVLS", "1")):
        env.setdefault(k, v)
    return env

  def start(self, name: str, module: str, args: list[str], devices: int = 1,
            role: str = "") -> Proc:
    port_file = self.run_dir / f"{name}.port"
    port_file.unlink(missing_ok=True)  # a stale one from an earlier run
    log = self.run_dir / f"{name}.log"
    popen = self._popen(name, module, args, devices, port_file, log)
    p = Proc(name, popen, port_file, log, module=module, args=list(args),
             devices=devices, role=role or _role_of(module, args))
    self.procs.append(p)
    return p

  def _popen(self, name, module, args, devices, port_file, log,
             mode: str = "wb") -> subprocess.Popen:
    # Through pdjax.launch.child: the process dies with this one.
    cmd = [sys.executable, "-m", "pdjax.launch.child", module,
           f"--port_file={port_file}", f"--host={self.host}", *args]
    cmd += self.gpu_flags(name) if devices else []
    env = self._env(devices, name)
    env[PARENT_ENV] = str(os.getpid())
    with open(log, mode) as out:
      return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                              env=env, start_new_session=True)

  def restart(self, p: Proc) -> None:
    """Starts ``p`` again with its arguments, on the ports it served on
    (appending to its log)."""
    port = p.port() or p.last_port
    p.last_port = port
    http_port = p.http_port or p.last_http_port
    p.last_http_port = http_port
    args = [a for a in p.args if not a.startswith("--port=")
            and not (http_port and a.startswith("--http_port="))]
    if port:
      args.append(f"--port={port}")
    if http_port:
      args.append(f"--http_port={http_port}")
    p.port_file.unlink(missing_ok=True)
    with open(p.log, "ab") as out:
      out.write(f"\n----- restarted by the launcher ({len(p.restarts)}) "
                "-----\n".encode())
    p.args = args
    p.popen = self._popen(p.name, p.module, args, p.devices, p.port_file,
                          p.log, mode="ab")

  def spawn_worker(self, role: str) -> Proc:
    """One more worker of ``role`` in an elastic deployment (it registers
    with the router itself)."""
    if role not in self.worker_specs:
      raise UsageError(f"no {role} worker spec: launch(elastic=True) first")
    module, args, devices = self.worker_specs[role]
    n = self._serial.get(role, 0)
    names = {p.name for p in self.procs}
    while f"{role}{n}" in names:
      n += 1
    self._serial[role] = n + 1
    return self.start(f"{role}{n}", module, args, devices, role=role)

  def stop_proc(self, p: Proc, sig: int = signal.SIGTERM) -> None:
    """Stops one process on purpose (a worker drains on SIGTERM); the
    supervisor does not restart it."""
    p.stopping = True
    if p.popen.poll() is None:
      with contextlib.suppress(ProcessLookupError):
        os.killpg(p.popen.pid, sig)

  def wait_ready(self, procs: list[Proc], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(procs)
    while pending:
      for p in list(pending):
        if p.port() is not None:
          pending.remove(p)
        elif p.popen.poll() is not None:
          raise ProcessFailed(
              f"{p.name} exited with {exit_status(p.popen.returncode)} "
              f"before serving: {last_line(p.log)} (log {p.log})", p.name,
              p.popen.returncode)
      if time.monotonic() > deadline:
        names = ", ".join(p.name for p in pending)
        raise ProcessFailed(f"not ready after {timeout_s:.0f} s: {names} "
                            f"(logs in {self.run_dir})")
      time.sleep(0.1)

  def stop(self, grace_s: float = 20.0) -> None:
    for p in reversed(self.procs):
      p.stopping = True
      if p.popen.poll() is None:
        with contextlib.suppress(ProcessLookupError):
          os.killpg(p.popen.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in self.procs:
      remaining = max(0.1, deadline - time.monotonic())
      try:
        p.popen.wait(remaining)
      except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
          os.killpg(p.popen.pid, signal.SIGKILL)
        p.popen.wait()


def _role_of(module: str, args) -> str:
  name = module.rsplit(".", 1)[-1]
  if name == "worker":
    for a in args:
      if a.startswith("--role="):
        return a.split("=", 1)[1]
  return name


def exit_status(code: int | None) -> str:
  """'code 1' or 'signal SIGKILL' for a Popen returncode."""
  if code is None:
    return "no status"
  if code < 0:
    try:
      return f"signal {signal.Signals(-code).name}"
    except ValueError:
      return f"signal {-code}"
  return f"code {code}"


def last_line(path: Path) -> str:
  """The last non-empty line of a log: what a failed process said last."""
  lines = [ln for ln in tail(path, 40).splitlines() if ln.strip()]
  for ln in reversed(lines):
    if not ln.startswith(("  ", "Traceback", "----- ")):
      return ln.strip()
  return lines[-1].strip() if lines else "(empty log)"


class Supervisor:
  """Restarts the processes of a ``LocalCluster`` that die (see the module
  docstring); call ``check`` every fraction of a second from the thread
  that started them."""

  def __init__(self, cluster: LocalCluster, *, max_restarts: int = 5,
               restart_window_s: float = 120.0, backoff_s: float = 0.5,
               max_backoff_s: float = 15.0, log=print):
    self.cluster = cluster
    self.max_restarts = max_restarts
    self.restart_window_s = restart_window_s
    self.backoff_s = backoff_s
    self.max_backoff_s = max_backoff_s
    self.log = log
    self._due: dict[int, float] = {}    # id(proc) -> when to restart it
    self.restarted: list[tuple[str, float]] = []

  def check(self) -> None:
    """Restarts what died (after its back-off); raises ``ProcessFailed``
    for a process that died ``max_restarts`` times within the window."""
    now = time.monotonic()
    for p in list(self.cluster.procs):
      if p.stopping or p.popen.poll() is None:
        continue
      unit = p.group[0] if p.group else p    # a jax.distributed job: as one
      members = p.group or [p]
      key = id(unit)
      if key not in self._due:
        recent = [t for t in unit.restarts if now - t < self.restart_window_s]
        if len(recent) >= self.max_restarts:
          raise ProcessFailed(
              f"{p.name} exited with {exit_status(p.popen.returncode)} "
              f"{len(recent) + 1} times within {self.restart_window_s:.0f} "
              f"s; giving up: {last_line(p.log)} (log {p.log})", p.name,
              p.popen.returncode)
        delay = min(self.backoff_s * 2 ** len(recent), self.max_backoff_s)
        self._due[key] = now + delay
        for q in members:
          q.last_port = q.port() or q.last_port
          if q is not p and q.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
              os.killpg(q.popen.pid, signal.SIGKILL)
            q.popen.wait()
        self.log(f"{p.name} exited with {exit_status(p.popen.returncode)}; "
                 f"restarting it in {delay:.1f} s")
        continue
      if now < self._due[key]:
        continue
      del self._due[key]
      if p.group:
        coordinator = f"{self.cluster.host}:{free_port(self.cluster.host)}"
        for q in members:
          q.args = [f"--coordinator_address={coordinator}"
                    if a.startswith("--coordinator_address=") else a
                    for a in q.args]
      for q in members:
        q.restarts.append(now)
        self.cluster.restart(q)
        self.restarted.append((q.name, now))


def visible_gpus(setting: str | None) -> list[str] | None:
  """The GPUs a local deployment may hand out, from the launcher's own
  ``CUDA_VISIBLE_DEVICES`` (None: unset, every GPU from 0 up). Honouring it
  lets two deployments share one host on disjoint GPUs (``0,1`` and
  ``2,3``), as every CUDA program honours it."""
  if setting is None:
    return None
  ids = [s.strip() for s in setting.split(",") if s.strip()]
  return ids


def free_port(host: str = "127.0.0.1") -> int:
  """A port free now (for a jax.distributed coordinator)."""
  with socket.socket() as s:
    s.bind((host, 0))
    return s.getsockname()[1]


def tail(path: Path, lines: int = 40) -> str:
  try:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
  except FileNotFoundError:
    return "(no log)"


@functools.lru_cache(maxsize=None)
def launcher_flags(module: str) -> frozenset[str]:
  """The flags ``python -m module`` defines (its ``define_flags``, run on a
  throwaway ``FlagValues``: nothing is defined in this process)."""
  from absl import flags
  fv = flags.FlagValues()
  importlib.import_module(module).define_flags(fv)
  return frozenset(fv)


def _flag_name(arg: str) -> str:
  return arg.lstrip("-").partition("=")[0]


def flags_for(module: str, args) -> list[str]:
  """The flags of ``args`` that ``module``'s launcher defines (a boolean
  flag's ``--noname`` form included)."""
  defined = launcher_flags(module)
  return [a for a in args if _flag_name(a) in defined or (
      _flag_name(a).startswith("no") and _flag_name(a)[2:] in defined)]


def resolve_deployment(config: str, overrides=None, *,
                       checkpoint: str | None = None,
                       kv_transport: str | None = None,
                       prefill_mesh: str | None = None,
                       decode_mesh: str | None = None,
                       local_prefill_threshold: int | None = None):
  """The configuration a local deployment runs: ``config``'s file with
  ``overrides`` (``pdjax.config.resolve``'s form) and the named settings
  on top. Raises UsageError naming what is wrong."""
  from pdjax.config import resolve
  from pdjax.launch.config_flags import merge
  named: dict = {}
  if checkpoint:
    named["checkpoint"] = checkpoint
  if kv_transport:
    named["kv_transport"] = kv_transport
  if prefill_mesh:
    named["prefill"] = {"mesh": prefill_mesh}
  if decode_mesh:
    named["decode"] = {"mesh": decode_mesh}
  if local_prefill_threshold is not None:
    named["router"] = {"local_prefill_threshold": local_prefill_threshold}
  try:
    return resolve(config, merge(overrides or {}, named))
  except (OSError, ValueError) as e:
    raise UsageError(str(e)) from None


def launch(cluster: LocalCluster, *, config: str = "local", overrides=None,
           checkpoint: str | None = None, kv_transport: str | None = None,
           num_prefill: int = 1, num_decode: int = 1,
           prefill_mesh: str | None = None, decode_mesh: str | None = None,
           prefill_processes: int = 1,
           router_port: int = 0, local_prefill_threshold: int | None = None,
           worker_flags=(), router_flags=(), ready_timeout_s: float = 600.0,
           kv_store: bool = False, kv_store_flags=()) -> str:
  """Starts a deployment; returns the router address once all are ready.

  ``config`` is a deployment file (path or packaged name); ``overrides``
  and the named settings change it (``resolve_deployment``), and every
  process runs the result, written to ``cluster.config_path``.
  ``prefill_processes`` > 1: each prefill worker is that many processes
  over jax.distributed, its mesh spread evenly over them, as the pods of one
  multi-host pool would be; process 0 serves (``pdjax.engine.lockstep``).
  ``kv_store``: a KV store process (``kvstore0``, ``pdjax.launch.kvstore``
  with ``kv_store_flags``) shared by the prefill workers, which then
  fetch (``[prefill] kv_fetch``: auto where the deployment has it off) and
  write through to it; the router counts its blocks."""
  dep = resolve_deployment(
      config, overrides, checkpoint=checkpoint, kv_transport=kv_transport,
      prefill_mesh=prefill_mesh, decode_mesh=decode_mesh,
      local_prefill_threshold=local_prefill_threshold)
  if kv_store and dep.prefill.kv_fetch == "off":
    # A worker that uses a store also shares its cache.
    dep = dataclasses.replace(dep, prefill=dataclasses.replace(
        dep.prefill, kv_fetch="auto"))
  path = cluster.write_config(dep)
  transport = dep.kv_transport
  pmesh, dmesh = dep.prefill.mesh, dep.decode.mesh
  worker_flags = list(worker_flags)
  modules = (["pdjax.launch.worker"] if transport == "local" else
             ["pdjax.launch.prefill"] * bool(num_prefill)
             + ["pdjax.launch.decode"] * bool(num_decode))
  unread = [f for f in worker_flags
            if not any(flags_for(m, [f]) for m in modules)]
  if unread:
    raise UsageError(f"no worker of this deployment reads {unread}")
  common = [f"--config={path}"]
  store_flags: list[str] = []
  if kv_store:
    store = cluster.start("kvstore0", "pdjax.launch.kvstore",
                          ["--metrics_port=0", *kv_store_flags], devices=0)
    cluster.wait_ready([store], ready_timeout_s)
    store_address = f"{cluster.host}:{store.port()}"
    store_flags = [f"--kv_store={store_address}"]
    router_flags = [f"--kv_stores={store_address}", *router_flags]
  pf, df = dep.prefill.gpu_memory_fraction, dep.decode.gpu_memory_fraction
  if transport == "local":
    both = max((f for f in (pf, df) if f is not None), default=None)
    gpu_workers = [GpuWorker(f"pd{i}", mesh_size(pmesh) + mesh_size(dmesh),
                             both) for i in range(num_decode)]
  else:
    gpu_workers = [
        GpuWorker(f"prefill{i}" + (f"p{k}" if k else ""),
                  mesh_size(pmesh) // max(prefill_processes, 1), pf)
        for i in range(num_prefill) for k in range(prefill_processes)]
    gpu_workers += [GpuWorker(f"decode{i}", mesh_size(dmesh), df)
                    for i in range(num_decode)]
  cluster.assign(gpu_workers)
  prefill, decode, followers = [], [], []
  if transport == "local":
    if num_prefill < 1:
      raise UsageError("--kv_transport=local needs a prefill pool")
    for i in range(num_decode):
      p = cluster.start(f"pd{i}", "pdjax.launch.worker",
                        ["--role=both", *common, *worker_flags,
                         *store_flags],
                        devices=mesh_size(pmesh) + mesh_size(dmesh))
      prefill.append(p)
      decode.append(p)
  else:
    size = mesh_size(pmesh)
    if prefill_processes < 1 or size % prefill_processes:
      raise UsageError(f"prefill mesh {pmesh} ({size} devices) does not "
                       f"split over {prefill_processes} processes")
    decode_names = [f"decode{i}" for i in range(num_decode)]
    pflags = flags_for("pdjax.launch.prefill", worker_flags)
    dflags = flags_for("pdjax.launch.decode", worker_flags)
    for i in range(num_prefill):
      if prefill_processes == 1:
        prefill.append(cluster.start(
            f"prefill{i}", "pdjax.launch.prefill",
            [*common, *pflags, *store_flags,
             *cluster.prefill_flags(f"prefill{i}", decode_names,
                                    worker_flags)], devices=size))
        continue
      coordinator = f"{cluster.host}:{free_port(cluster.host)}"
      for k in range(prefill_processes):
        p = cluster.start(
            f"prefill{i}" + (f"p{k}" if k else ""), "pdjax.launch.prefill",
            [f"--coordinator_address={coordinator}",
             f"--num_processes={prefill_processes}", f"--process_id={k}",
             *common, *pflags], devices=size // prefill_processes)
        if k == 0:
          prefill.append(p)        # serves; the others follow it
          p.group = [p]
        else:
          followers.append(p)
          p.group = prefill[-1].group
          p.group.append(p)
    for i in range(num_decode):
      decode.append(cluster.start(
          f"decode{i}", "pdjax.launch.decode",
          [*common, *dflags], devices=mesh_size(dmesh)))
  workers = list(dict.fromkeys(prefill + decode))
  cluster.wait_ready(workers, ready_timeout_s)
  for p in followers:        # they serve nothing, but must still be there
    if p.popen.poll() is not None:
      raise ProcessFailed(f"{p.name} exited with "
                          f"{exit_status(p.popen.returncode)}: "
                          f"{last_line(p.log)} (log {p.log})", p.name,
                          p.popen.returncode)
  host = cluster.host
  router_args = [
      f"--config={path}",
      f"--prefill_workers={','.join(f'{host}:{p.port()}' for p in prefill)}",
      f"--decode_workers={','.join(f'{host}:{p.port()}' for p in decode)}",
      f"--port={router_port}", "--wait_workers_s=60", *router_flags]
  router = cluster.start("router", "pdjax.launch.router", router_args,
                         devices=0)
  cluster.wait_ready([router], ready_timeout_s)
  return f"{host}:{router.port()}"


def launch_elastic(cluster: LocalCluster, *, config: str = "local",
                   overrides=None, checkpoint: str | None = None,
                   kv_transport: str | None = None, num_prefill: int = 1,
                   num_decode: int = 1, num_flex: int = 0,
                   flex_role: str = "decode",
                   prefill_mesh: str | None = None,
                   decode_mesh: str | None = None, router_port: int = 0,
                   local_prefill_threshold: int | None = None,
                   worker_flags=(), router_flags=(), lease_s: float = 5.0,
                   ready_timeout_s: float = 600.0) -> str:
  """An elastic deployment: the router first, then workers that register
  with it (``--router``) instead of being listed, so that pools grow and
  shrink while it runs (``LocalCluster.spawn_worker`` starts one more,
  ``stop_proc`` drains one away). ``num_flex`` workers hold both pools'
  programs (``--role=both``) and serve ``flex_role`` at start; they can be
  moved between the pools. The deployment is resolved once, as ``launch``
  resolves it, with ``[router] lease_s`` set to ``lease_s`` (the lease the
  workers ask for). Returns the router's address once every worker is
  registered and ready."""
  from pdjax.launch.config_flags import merge
  dep = resolve_deployment(
      config, merge(overrides or {}, {"router": {"lease_s": lease_s}}),
      checkpoint=checkpoint, kv_transport=kv_transport,
      prefill_mesh=prefill_mesh, decode_mesh=decode_mesh,
      local_prefill_threshold=local_prefill_threshold)
  transport = dep.kv_transport
  if transport == "local":
    raise UsageError("an elastic deployment moves KV between processes: "
                     "--kv_transport=grpc or device, not local")
  if num_decode + (num_flex if flex_role == "decode" else 0) < 1:
    raise UsageError("an elastic deployment needs a decode worker to start")
  pmesh, dmesh = dep.prefill.mesh, dep.decode.mesh
  worker_flags = list(worker_flags)
  modules = {"prefill": "pdjax.launch.prefill",
             "decode": "pdjax.launch.decode",
             "flex": "pdjax.launch.worker"}
  unread = [f for f in worker_flags
            if not any(flags_for(m, [f]) for m in modules.values())]
  if unread:
    raise UsageError(f"no worker of this deployment reads {unread}")
  path = cluster.write_config(dep)
  names = ([f"prefill{i}" for i in range(num_prefill)]
           + [f"decode{i}" for i in range(num_decode)]
           + [f"flex{i}" for i in range(num_flex)])
  gpu_workers = (
      [GpuWorker(n, mesh_size(pmesh), dep.prefill.gpu_memory_fraction)
       for n in names if n.startswith("prefill")]
      + [GpuWorker(n, mesh_size(dmesh), dep.decode.gpu_memory_fraction)
         for n in names if n.startswith("decode")]
      + [GpuWorker(n, mesh_size(pmesh) + mesh_size(dmesh))
         for n in names if n.startswith("flex")])
  cluster.assign(gpu_workers)
  router_args = [f"--config={path}", f"--port={router_port}",
                 "--wait_workers_s=0", *router_flags]
  router = cluster.start("router", "pdjax.launch.router", router_args,
                         devices=0)
  cluster.wait_ready([router], ready_timeout_s)
  address = f"{cluster.host}:{router.port()}"
  cluster.router_address = address
  common = [f"--config={path}", f"--router={address}"]
  cluster.worker_specs = {
      "prefill": (modules["prefill"],
                  [*common, *flags_for(modules["prefill"], worker_flags)],
                  mesh_size(pmesh)),
      "decode": (modules["decode"],
                 [*common, *flags_for(modules["decode"], worker_flags)],
                 mesh_size(dmesh)),
      "flex": (modules["flex"],
               ["--role=both", f"--serve_role={flex_role}", *common,
                *flags_for(modules["flex"], worker_flags)],
               mesh_size(pmesh) + mesh_size(dmesh)),
  }
  procs = [cluster.spawn_worker(role) for role in ("prefill",) * num_prefill
           + ("decode",) * num_decode + ("flex",) * num_flex]
  cluster.wait_ready(procs, ready_timeout_s)
  want = {"prefill": num_prefill + (num_flex if flex_role == "prefill"
                                    else 0),
          "decode": num_decode + (num_flex if flex_role == "decode" else 0)}
  wait_pools(cluster, want, ready_timeout_s, router_flags)
  return address


def router_security(cluster: LocalCluster, router_flags=()):
  """The ``Security`` of a launcher's internal calls to its router
  (``pdjax.v1.Registry``): the deployment's service token, and the
  router's TLS where it serves TLS."""
  from pdjax.service.common import Security
  values: dict[str, str] = {}
  for f in router_flags:
    name, _, value = f.lstrip("-").partition("=")
    values[name] = value
  tls = bool(values.get("tls_cert"))
  return Security(ca=values.get("tls_ca") if tls else None,
                  cert=values.get("tls_cert") if tls else None,
                  key=values.get("tls_key") if tls else None,
                  server_name=values.get("tls_server_name"),
                  service_token=cluster.service_token)


def router_workers(cluster: LocalCluster, router_flags=(),
                   timeout_s: float = 5.0) -> list:
  """The router's ``ListWorkers`` (``WorkerStatus`` messages)."""
  from pdjax.service.common import make_channel
  from pdjax.v1 import registry_pb2, registry_pb2_grpc
  with make_channel(cluster.router_address,
                    router_security(cluster, router_flags)) as ch:
    return list(registry_pb2_grpc.RegistryStub(ch).ListWorkers(
        registry_pb2.ListWorkersRequest(), timeout=timeout_s).workers)


def wait_pools(cluster: LocalCluster, want: dict[str, int],
               timeout_s: float, router_flags=()) -> None:
  """Waits until the router has ``want[role]`` ready workers per pool."""
  import grpc
  deadline = time.monotonic() + timeout_s
  ready: dict[str, int] = {}
  while True:
    try:
      ready = {}
      for w in router_workers(cluster, router_flags):
        if w.state == "ready":
          ready[w.role] = ready.get(w.role, 0) + 1
      if all(ready.get(r, 0) >= n for r, n in want.items()):
        return
    except grpc.RpcError:
      pass
    for p in cluster.procs:
      if not p.stopping and p.popen.poll() is not None:
        raise ProcessFailed(f"{p.name} exited with "
                            f"{exit_status(p.popen.returncode)}: "
                            f"{last_line(p.log)} (log {p.log})", p.name,
                            p.popen.returncode)
    if time.monotonic() > deadline:
      raise ProcessFailed(f"the router has {ready} ready workers after "
                          f"{timeout_s:.0f} s, not {want} (logs in "
                          f"{cluster.run_dir})")
    time.sleep(0.2)


# Router flags a client of the router must share (its TLS and bearer token).
_ROUTER_SECURITY_FLAGS = ("tls_", "notls_", "auth_token")


def start_gateway(cluster: LocalCluster, router_address: str, *,
                  config: str | None = None, checkpoint: str | None = None,
                  port: int = 0, router_flags=(), gateway_flags=(),
                  ready_timeout_s: float = 120.0) -> str:
  """Starts the OpenAI-compatible gateway in front of a router ``launch``
  started; returns its base URL once it serves. It reads the deployment
  ``launch`` resolved (``config``: another file) and dials the router with
  the router's own TLS and token flags (``router_flags``) that a client
  takes."""
  security = flags_for("pdjax.launch.gateway", [
      f for f in router_flags
      if f.lstrip("-").startswith(_ROUTER_SECURITY_FLAGS)])
  config = config or cluster.config_path or "local"
  args = [f"--router={router_address}", f"--config={config}",
          f"--port={port}", *security, *gateway_flags]
  if checkpoint:
    args.append(f"--checkpoint={checkpoint}")
  gateway = cluster.start("gateway", "pdjax.launch.gateway", args, devices=0)
  cluster.wait_ready([gateway], ready_timeout_s)
  return f"http://{cluster.host}:{gateway.port()}"


def chat_prompt(config, checkpoint: str | None, prompt: str
                ) -> tuple[str, str] | None:
  """``prompt`` as one user message rendered with the chat template of the
  deployment's model (``checkpoint``, else the deployment file's), and
  where the template came from; None when the model has none."""
  from pdjax.config import DeploymentConfig
  from pdjax.gateway.chat_template import load_chat_template
  from pdjax.model import presets
  from pdjax.model.registry import resolve_checkpoint
  spec = checkpoint or DeploymentConfig.load(config).checkpoint
  if presets.is_random(spec):
    return None
  template = load_chat_template(None, resolve_checkpoint(spec))
  if template is None:
    return None
  return (template.render([{"role": "user", "content": prompt}]),
          template.origin)


def router_client_settings(router_flags) -> tuple:
  """(TlsConfig or None, token) to dial a router started with these flags.

  ``--prompt`` must speak the router's security: TLS if it serves TLS,
  presenting the router's own certificate (it is a deployment certificate,
  valid for client use) where mutual TLS is on, and its bearer token.
  """
  values: dict[str, str] = {}
  for f in router_flags:
    name, _, value = f.lstrip("-").partition("=")
    if name == "notls_mtls":
      name, value = "tls_mtls", "false"
    values[name] = value or "true"
  token = values.get("auth_token", os.environ.get("PDJAX_AUTH_TOKEN"))
  if not values.get("tls_cert"):
    return None, token
  from pdjax.client import TlsConfig
  mtls = values.get("tls_mtls", "false").lower() in ("true", "1")
  return TlsConfig(root_ca=values.get("tls_ca"),
                   cert=values["tls_cert"] if mtls else None,
                   key=values.get("tls_key") if mtls else None,
                   server_name=values.get("tls_server_name")), token


