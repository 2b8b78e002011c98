"""One jitted program per (function, settings) in a process."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from pdjax.engine.shared_jit import shared_jit


def _scaled(x, *, by, shape=None):
  return x * by


def test_equal_settings_share_one_program_and_its_trace():
  traces = []

  def f(x, *, by):
    traces.append(by)
    return x * by

  a = shared_jit(functools.partial(f, by=2), donate_argnums=())
  b = shared_jit(functools.partial(f, by=2), donate_argnums=())
  assert a is b
  assert float(a(jnp.float32(3))) == 6.0
  assert float(b(jnp.float32(4))) == 8.0
  assert traces == [2]                    # traced once for both
  # Other settings, another program: a keyword, a jit option, the function.
  assert shared_jit(functools.partial(f, by=3)) is not a
  assert shared_jit(functools.partial(f, by=2)) is not a
  assert shared_jit(functools.partial(_scaled, by=2)) is not a
  # Containers compare by their items.
  c = shared_jit(functools.partial(_scaled, by=1, shape=(2, [3, 4])))
  assert shared_jit(functools.partial(_scaled, by=1, shape=(2, [3, 4]))) is c


def test_settings_that_cannot_be_hashed_get_a_program_of_their_own():
  w = np.ones(3)
  a = shared_jit(functools.partial(_scaled, by=w))
  b = shared_jit(functools.partial(_scaled, by=w))
  assert a is not b
  np.testing.assert_array_equal(np.asarray(a(jnp.ones(3))), np.ones(3))
