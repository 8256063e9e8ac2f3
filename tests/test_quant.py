"""Quantizers: values against the paper's formulas, STE gradients, levels, no recompiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from qnet.quant import quantizers as quant


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_uniform_quantize_matches_hand_values(bits):
  n = 2**bits - 1
  x = np.linspace(0, 1, 101, dtype=np.float32)
  expected = np.round(x * n) / n
  np.testing.assert_allclose(quant.uniform_quantize(jnp.asarray(x), bits), expected, atol=1e-6)


def test_hand_computed_two_bit_values():
  # k=2: levels {0, 1/3, 2/3, 1}; weights map to {-1, -1/3, 1/3, 1}.
  a = quant.quantize_activations(jnp.array([-0.3, 0.1, 0.2, 0.5, 0.9, 1.7]), 2)
  np.testing.assert_allclose(a, [0, 0, 1 / 3, 2 / 3, 1, 1], atol=1e-6)
  w = jnp.array([-2.0, -0.5, 0.1, 1.0])
  t = np.tanh(np.asarray(w))
  w01 = t / (2 * np.abs(t).max()) + 0.5
  expected = 2 * np.round(3 * w01) / 3 - 1
  np.testing.assert_allclose(quant.quantize_weights(w, 2), expected, atol=1e-6)
  np.testing.assert_allclose(quant.quantize_weights(w, 2), [-1, -1 / 3, 1 / 3, 1], atol=1e-6)


def test_full_precision_is_identity_for_weights_and_clip_for_activations():
  w = jnp.array([-3.0, 0.2, 5.0])
  np.testing.assert_array_equal(quant.quantize_weights(w, 32), w)
  np.testing.assert_array_equal(quant.quantize_activations(w, 32), jnp.clip(w, 0, 1))


def test_per_channel_uses_each_output_channels_max():
  w = jnp.array([[0.1, 2.0], [-0.05, -1.0]])  # column = output channel
  q = quant.quantize_weights(w, 1, per_channel=True)
  np.testing.assert_allclose(q, [[1, 1], [-1, -1]], atol=1e-6)


def test_activation_ste_gradient_is_the_clip_mask():
  x = jnp.array([-1.0, 0.0, 0.2, 0.6, 1.0, 1.5])
  g = jax.grad(lambda x: jnp.sum(quant.quantize_activations(x, 3) * jnp.arange(1.0, 7.0)))(x)
  np.testing.assert_array_equal(g, [0, 2, 3, 4, 5, 0])


def test_round_is_straight_through():
  x = jnp.array([0.1, 0.4, 0.77])
  g = jax.grad(lambda x: jnp.sum(quant.uniform_quantize(x, 2) * jnp.array([1.0, 2.0, 3.0])))(x)
  np.testing.assert_array_equal(g, [1, 2, 3])


def test_weight_gradient_flows_through_tanh_and_normalisation():
  w = jnp.array([-0.8, 0.3, 0.5])
  g = jax.grad(lambda w: jnp.sum(quant.quantize_weights(w, 4) * jnp.array([1.0, -2.0, 0.5])))(w)
  # With round as identity, the function is 2 * (tanh(w) / (2 max|tanh|) + 1/2) - 1.
  ref = jax.grad(
    lambda w: jnp.sum((jnp.tanh(w) / jnp.max(jnp.abs(jnp.tanh(w)))) * jnp.array([1.0, -2.0, 0.5]))
  )(w)
  np.testing.assert_allclose(g, ref, rtol=1e-5)


def test_changing_bits_does_not_recompile():
  traces = []

  @jax.jit
  def f(x, w, bits):
    traces.append(1)
    return quant.quantize_activations(x, bits).sum() + quant.quantize_weights(w, bits).sum()

  x = jnp.linspace(-1, 2, 16)
  outs = {b: float(f(x, x, jnp.float32(b))) for b in (32, 8, 4, 2, 1)}
  assert len(traces) == 1
  assert len(set(outs.values())) == 5


finite = st.floats(-1e6, 1e6, allow_nan=False, width=32)
# A fixed shape: every example reuses the same compiled quantizer (shapes would recompile).
arrays = hnp.arrays(np.float32, 64, elements=finite)
bits_st = st.integers(1, 8)


@settings(max_examples=60, deadline=None)
@given(arrays, bits_st)
def test_weights_in_range_with_at_most_2k_levels(w, bits):
  q = np.asarray(quant.quantize_weights(jnp.asarray(w), bits))
  assert np.all(np.isfinite(q)) and q.min() >= -1 - 1e-6 and q.max() <= 1 + 1e-6
  assert len(np.unique(np.round(q, 5))) <= 2**bits


@settings(max_examples=60, deadline=None)
@given(arrays, bits_st)
def test_activations_in_range_levels_idempotent_monotone(x, bits):
  q = np.asarray(quant.quantize_activations(jnp.asarray(x), bits))
  assert q.min() >= 0 and q.max() <= 1
  assert len(np.unique(q)) <= 2**bits
  np.testing.assert_allclose(quant.quantize_activations(jnp.asarray(q), bits), q, atol=1e-6)
  order = np.argsort(x, kind="stable")
  assert np.all(np.diff(q[order]) >= -1e-7)


@settings(max_examples=60, deadline=None)
@given(arrays, bits_st)
def test_weight_quantizer_is_monotone_and_on_its_levels(w, bits):
  q = np.asarray(quant.quantize_weights(jnp.asarray(w), bits))
  order = np.argsort(w, kind="stable")
  assert np.all(np.diff(q[order]) >= -1e-6)
  # Every value is one of the 2^k levels 2i/n - 1 of [-1, 1]. (Not idempotent beyond 2
  # bits: the tanh in front bends the levels, so q(q(w)) != q(w) in general.)
  n = 2**bits - 1
  i = (q + 1) / 2 * n
  np.testing.assert_allclose(i, np.round(i), atol=1e-4 * n)
  assert q.min() >= -1 - 1e-6 and q.max() <= 1 + 1e-6 and len(np.unique(q)) <= 2**bits


@settings(max_examples=40, deadline=None)
@given(arrays, st.sampled_from([1, 2, 4, 8, 32]))
def test_gradients_are_finite(w, bits):
  gw = jax.grad(lambda w: quant.quantize_weights(w, bits).sum())(jnp.asarray(w))
  ga = jax.grad(lambda x: quant.quantize_activations(x, bits).sum())(jnp.asarray(w))
  assert np.all(np.isfinite(gw)) and np.all(np.isfinite(ga))


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 32])
@pytest.mark.heavy
def test_zero_and_tiny_kernels_stay_finite(bits):
  for w in (jnp.zeros((3, 3, 2, 2)), jnp.full((4,), 1e-30)):
    q = quant.quantize_weights(w, bits)
    g = jax.grad(lambda w: quant.quantize_weights(w, bits).sum())(w)
    assert np.all(np.isfinite(q)) and np.all(np.isfinite(g))


def test_huge_kernels_saturate_and_inf_is_handled():
  q = quant.quantize_weights(jnp.array([-1e30, 0.0, 1e30, jnp.inf, -jnp.inf]), 2)
  np.testing.assert_allclose(q, [-1, 1 / 3, 1, 1, -1], atol=1e-6)
  a = quant.quantize_activations(jnp.array([-jnp.inf, jnp.inf]), 4)
  np.testing.assert_array_equal(a, [0, 1])


def test_nan_propagates_and_is_not_hidden():
  assert np.isnan(quant.quantize_activations(jnp.array([jnp.nan]), 4)).all()
  assert np.isnan(quant.quantize_weights(jnp.array([jnp.nan, 1.0]), 4)).any()
