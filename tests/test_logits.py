"""The LM head (``llama._logits``): one row is computed as a row of a
two-row GEMM, never as a matrix-vector product (which XLA's GPU compiler
runs in float32, widening the whole head on every call), with the logits a
batch gives that row."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdjax.model import llama
from pdjax.model.presets import preset_config


@pytest.fixture(scope="module")
def model():
  cfg = preset_config("tiny")
  return llama.init_params(cfg, seed=3), cfg


def _head_dots(hlo: str) -> list[tuple[int, ...]]:
  """Result shapes of the dots of an optimized HLO module."""
  return [tuple(int(d) for d in m.group(1).split(",") if d)
          for m in re.finditer(r"= f32\[([\d,]*)\]\{[^}]*\} dot\(", hlo)]


@pytest.mark.parametrize("shape", [(1,), (1, 1)])
def test_one_row_runs_as_two(model, shape):
  params, cfg = model
  x = jnp.ones(shape + (cfg.hidden_size,), cfg.dtype)
  fn = jax.jit(lambda p, x: llama._logits(cfg, p, x))
  dots = _head_dots(fn.lower(params, x).compile().as_text())
  assert dots and all(d[0] == 2 for d in dots), dots
  assert fn(params, x).shape == shape + (cfg.vocab_size,)


def test_one_row_gives_the_batchs_logits(model):
  params, cfg = model
  x = jax.random.normal(jax.random.PRNGKey(0), (3, cfg.hidden_size),
                        cfg.dtype)
  fn = jax.jit(lambda p, x: llama._logits(cfg, p, x))
  batch = np.asarray(fn(params, x))
  for i in range(3):
    one = np.asarray(fn(params, x[i:i + 1]))
    # The same products in float32, summed over hidden_size terms: apart
    # only by the order of the sums.
    h = llama.rms_norm(x[i], params["final_norm"], cfg.rms_norm_eps)
    mag = np.abs(np.asarray(h, np.float32)) @ np.abs(
        np.asarray(params["lm_head"], np.float32))
    tol = 2 * cfg.hidden_size * np.finfo(np.float32).eps * mag
    assert (np.abs(one[0] - batch[i]) <= tol).all()
