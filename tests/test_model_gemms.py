"""The model's GEMMs as the compiler is asked for them: the LM head
(``llama._logits``) computes one row as a row of a two-row GEMM, never as
a matrix-vector product (which XLA's GPU compiler runs in float32,
widening the whole head on every call), with the logits a batch gives that
row; a projection of bf16 weights (``llama._dot``) asks for its result in
bf16, rounded by the GEMM, not in float32 rounded by another kernel."""

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


def _dot_general_types(fn, *args) -> list:
  """preferred_element_type of each dot_general in ``fn``'s jaxpr."""
  jaxpr = jax.make_jaxpr(fn)(*args)
  return [e.params["preferred_element_type"] for e in jaxpr.eqns
          if e.primitive.name == "dot_general"]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_projections_ask_for_their_activations_dtype(dtype):
  x = jnp.ones((2, 3, 16), dtype)
  w = jnp.ones((16, 4, 8), dtype)
  types = _dot_general_types(
      lambda x, w: llama._dot(x, w, "btd,dnh->btnh"), x, w)
  assert types == [jnp.dtype(dtype)]
  y = llama._dot(x, w, "btd,dnh->btnh")
  assert y.dtype == dtype and y.shape == (2, 3, 4, 8)


def test_a_bf16_projection_sums_in_float32():
  """Within what a float32 sum rounded once to bf16 allows of the exact
  product: K u32 sum|x w| for the sum, u |y| for the rounding (u = 2**-8,
  bf16's unit roundoff). A sum kept in bf16 would be off by about
  sqrt(K) u |y| and more, over this bound for K = 4096."""
  K = 4096
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(4, 1, K)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(K, 2, 8)), jnp.bfloat16)
  y = np.asarray(llama._dot(x, w, "btd,dnh->btnh"), np.float64)
  xs, ws = np.asarray(x, np.float64), np.asarray(w, np.float64)
  exact = np.einsum("btd,dnh->btnh", xs, ws)
  mag = np.einsum("btd,dnh->btnh", np.abs(xs), np.abs(ws))
  bound = K * 2.0**-24 * mag + 2.0**-8 * np.abs(exact)
  assert (np.abs(y - exact) <= bound).all()
