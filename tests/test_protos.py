"""The committed stubs in pdjax/v1/ are exactly what tools/gen_protos.py
makes from protos/ (a .proto edited without regenerating fails here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_stubs_match_protos(tmp_path):
  pytest.importorskip("grpc_tools")
  proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_protos.py"),
                         f"--out={tmp_path}"], capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr
  fresh = {p.name: p.read_bytes() for p in (tmp_path / "pdjax" / "v1").glob(
      "*.py*")}
  committed = {p.name: p.read_bytes() for p in (ROOT / "pdjax" / "v1").glob(
      "*.py*")}
  assert sorted(fresh) == sorted(committed)
  stale = [name for name in fresh if fresh[name] != committed[name]]
  assert not stale, (f"stubs out of date: {stale}; run "
                     "python tools/gen_protos.py")


def test_every_proto_has_stubs():
  protos = sorted(p.stem for p in (ROOT / "protos" / "pdjax" / "v1").glob(
      "*.proto"))
  for stem in protos:
    assert (ROOT / "pdjax" / "v1" / f"{stem}_pb2.py").exists(), stem
    assert (ROOT / "pdjax" / "v1" / f"{stem}_pb2_grpc.py").exists(), stem
