"""The one-stream TTFT hop trace (``tools/gpu/ttft_hops.patch`` and
``ttft_hops.py``): the patch still applies to this tree, and the table
reads the steps between marks from several processes' files."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools" / "gpu"))

import ttft_hops  # noqa: E402  pylint: disable=wrong-import-position


def test_patch_applies_to_this_tree():
  try:
    proc = subprocess.run(
        ["git", "apply", "--check", "tools/gpu/ttft_hops.patch"], cwd=REPO,
        capture_output=True, text=True, timeout=60)
  except OSError:
    pytest.skip("no git")
  assert proc.returncode == 0, proc.stderr


def test_steps_between_marks(tmp_path):
  # Two processes' files; three requests with send -> arrive 1, 2, 3 ms and
  # arrive -> first token 10 ms; a fourth without its client marks (a
  # request of another client) is left out.
  client, router = [], []
  for i, gap in enumerate((1e-3, 2e-3, 3e-3)):
    t = 100.0 + i
    client += [f"r{i} C_send {t:.6f}", f"r{i} C_recv {t + gap + 0.01:.6f}"]
    router.append(f"r{i} R_arrive {t + gap:.6f}")
  router.append("other R_arrive 50.0")
  (tmp_path / "t.1").write_text("\n".join(client) + "\n")
  (tmp_path / "t.2").write_text("\n".join(router) + "\n")
  requests = ttft_hops.read(str(tmp_path / "t"))
  assert len(requests) == 3
  lines = ttft_hops.table(requests)
  assert lines[0] == "3 requests; marks: C_send R_arrive C_recv"
  send, back = lines[1].split(), lines[2].split()
  assert send[:3] == ["C_send", "->", "R_arrive"]
  assert float(send[4]) == pytest.approx(2.0, abs=1e-3)   # p50, ms
  assert float(back[4]) == pytest.approx(10.0, abs=1e-3)
  assert lines[3].endswith("p50 12.000")
