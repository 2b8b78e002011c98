"""pdjax as a wheel: what ``pip install .`` puts on a machine.

The wheel is built once from a copy of the package (so the checkout gets no
build folders) and unpacked where a fresh interpreter imports it ahead of
any other pdjax: deployments, sharding rules and chat templates must
resolve by name from there, run from a directory that is not the checkout,
and the evaluation's dependencies must be an extra, not the server's.
"""

from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _setuptools_builds_wheels() -> bool:
  try:
    import setuptools
  except ImportError:
    return False
  major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
  return (major, minor) >= (70, 1)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
  src = tmp_path_factory.mktemp("src")
  shutil.copytree(ROOT / "pdjax", src / "pdjax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, src / name)
  out = tmp_path_factory.mktemp("wheel")
  # With this interpreter's setuptools where it can build wheels itself
  # (70.1 on), else in pip's isolated build environment.
  isolation = ["--no-build-isolation"] if _setuptools_builds_wheels() else []
  proc = subprocess.run(
      [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation,
       "-q", "-w", str(out), str(src)], capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (path,) = out.glob("pdjax-*.whl")
  return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
  """The wheel unpacked as site-packages would hold it."""
  site = tmp_path_factory.mktemp("site")
  with zipfile.ZipFile(wheel) as z:
    z.extractall(site)
  return site


def _metadata(wheel: Path) -> email.message.Message:
  with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    return email.message_from_bytes(z.read(name))


def test_the_wheel_carries_the_package_data(wheel):
  with zipfile.ZipFile(wheel) as z:
    names = set(z.namelist())
  data = [p.relative_to(ROOT).as_posix()
          for d in ("pdjax/configs", "pdjax/shardings")
          for p in (ROOT / d).rglob("*") if p.is_file()
          and "__pycache__" not in p.parts]
  assert any(p.endswith("deployments/local.toml") for p in data)
  assert any(p.endswith("chat_templates/plain.jinja") for p in data)
  assert any(p.endswith("shardings/prefill_tp.toml") for p in data)
  missing = sorted(set(data) - names)
  assert not missing, missing


def test_evaluation_dependencies_are_an_extra(wheel):
  requires = _metadata(wheel).get_all("Requires-Dist")
  for dep in ("matplotlib", "tqdm"):
    lines = [r for r in requires if r.startswith(dep)]
    assert lines and all('extra == "eval"' in r for r in lines), lines
  assert any(r.startswith("jax") and "extra" not in r for r in requires)


def _run_installed(site: Path, cwd: Path, *args: str
                   ) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(site))
  return subprocess.run([sys.executable, *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=120)


def test_the_installed_package_resolves_names_outside_the_checkout(
    installed, tmp_path):
  script = (
      "import pdjax, pathlib\n"
      "from pdjax import resources\n"
      "from pdjax.config import DeploymentConfig\n"
      "from pdjax.sharding import ShardingRules\n"
      "from pdjax.model import tiny\n"
      "print(pathlib.Path(pdjax.__file__).parent)\n"
      "print(DeploymentConfig.load('local').prefill.mesh)\n"
      "print(ShardingRules.load('prefill_tp').name)\n"
      "print(resources.read('chat_template', 'plain')[1])\n"
      "print(tiny._chat_template() == resources.read('chat_template', "
      "'plain')[0])\n")
  out = _run_installed(installed, tmp_path, "-c", script)
  assert out.returncode == 0, out.stderr[-3000:]
  where, mesh, rules, template, same = out.stdout.split()
  assert Path(where) == installed / "pdjax"
  assert mesh == "tp=3" and rules == "prefill_tp" and same == "True"
  assert Path(template).is_relative_to(installed)


def test_the_wheel_installs_the_pdjax_command(wheel):
  with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist()
                if n.endswith(".dist-info/entry_points.txt"))
    entry_points = z.read(name).decode()
  assert "[console_scripts]" in entry_points
  assert "pdjax = pdjax.cli:main" in entry_points


def test_the_command_runs_outside_the_checkout(installed, tmp_path):
  out = _run_installed(installed, tmp_path, "-m", "pdjax.cli", "--help")
  assert out.returncode == 0, out.stderr[-3000:]
  for command in ("serve", "bench", "plan"):
    assert f"  {command} " in out.stdout
  out = _run_installed(installed, tmp_path, "-m", "pdjax.cli", "serve",
                       "--helpfull")       # absl's help exits with 1
  assert "pdjax serve" in out.stdout, out.stderr[-3000:]
  for flag in ("--config", "--prompt", "--prefill_mesh", "--decode_max_seqs",
               "--max_inflight"):
    assert flag in out.stdout, flag
  # A deployment name is looked up among the packaged ones, which the
  # refusal lists; nothing is started.
  out = _run_installed(installed, tmp_path, "-m", "pdjax.cli", "serve",
                       "--config=no-such", "--prompt=hi",
                       f"--run_dir={tmp_path / 'run'}")
  assert out.returncode != 0
  assert "no-such" in out.stderr and "local, local-gpu" in out.stderr
  assert "Traceback" not in out.stderr
  out = _run_installed(installed, tmp_path, "-m", "pdjax.cli", "nonsense")
  assert out.returncode == 2 and "unknown command" in out.stderr


def test_bench_and_plan_import_no_jax(installed, tmp_path):
  """The measuring side runs where there is no accelerator stack: defining
  and parsing ``pdjax bench``'s and ``pdjax plan``'s flags imports no JAX
  (pdjax.eval's contract)."""
  for module in ("pdjax.eval.cli", "pdjax.planner.cli"):
    script = (
        "import sys\n"
        f"import {module} as m\n"
        "from pdjax.launch.flags import define_for_main\n"
        "define_for_main(m.define_flags)\n"
        "from absl import flags\n"
        "flags.FLAGS(['prog'])\n"
        "print('jax' in sys.modules)\n")
    out = _run_installed(installed, tmp_path, "-c", script)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["False"], module
