"""`qnet.deploy.qdq_onnx.fit_requant`: the fused int8 kernels' requantization (`K`, `B`, `M`
per channel) equals qnet's integer thresholds on every reachable accumulator. Pure numpy and
fast: the module mutation testing runs the fit against (`tools/mutation.py --tests`)."""

import numpy as np
import pytest

from qnet.deploy import integer, qdq_onnx


def assert_fit_equals_thresholds(fit, channels, acc, sign, u, n):
  """The fused requantization of accumulators `acc` (`[A, 1]` for every channel, or `[A]`
  for one) equals qnet's threshold codes in `channels`."""
  want = np.sum((acc * sign[channels])[..., None] >= u[channels], axis=-1)
  got = qdq_onnx.requant_codes(acc * fit.k[channels], fit.b[channels], fit.m[channels], n)
  np.testing.assert_array_equal(got, want)


def test_fit_requant_equals_the_thresholds_on_every_reachable_accumulator():
  rng = np.random.default_rng(0)
  # (3, 8, 5): with 8-bit inputs |k| <= 64 // 5 = 12 (127 // 5 would be 25; 65 // 5, 13);
  # (2, 2, 1): binary weight codes take the largest multiplier, 127.
  for bits, in_bits, max_w in ((2, 2, 3), (4, 4, 15), (3, 8, 7), (3, 8, 5), (4, 4, 8), (2, 2, 1)):
    c = 40
    scale = rng.uniform(0.01, 0.3, c) * rng.choice([-1, 1], c)
    scale[0] = 0.0  # a constant channel
    shift = rng.uniform(-3, integer.levels(bits) + 3, c)
    a_max = np.full(c, 300)
    fit = qdq_onnx.fit_requant(scale, shift, bits, np.full(c, max_w), a_max, in_bits)
    assert fit.ok.all(), (bits, fit.ok.mean())  # every channel of these fits
    assert (fit.k.dtype, fit.b.dtype, fit.m.dtype, fit.margin.dtype) == (np.int64, np.int64, np.float32, np.float64)
    assert np.all(fit.margin[1:] > 0) and np.all(np.isfinite(fit.margin[1:])) and fit.k[0] == 0
    acc = np.arange(-300, 301)[:, None]
    sign, u = integer.thresholds(scale, shift, bits)
    want = np.sum((acc * sign)[..., None] >= u, axis=-1)
    got = qdq_onnx.requant_codes(acc * fit.k, fit.b, fit.m, integer.levels(bits))
    np.testing.assert_array_equal(got[:, fit.ok], want[:, fit.ok])
    assert np.all(np.abs(fit.k[fit.ok][1:]) == (64 if in_bits == 8 else 127) // max_w)


def test_fit_requant_tries_a_smaller_weight_multiplier_where_the_largest_leaves_no_room():
  # Wide accumulators (a 3x3x256 conv at W4A4): about 2% of channels have no integer bias on
  # the 1/8 grid of k = 8 (= 127 // 15); a smaller k offers other fractions.
  rng = np.random.default_rng(0)
  c, a_max = 300, 25000
  scale, shift = rng.uniform(0.03, 0.08, c), rng.uniform(-6, 6, c)
  sign, u = integer.thresholds(scale, shift, 4)
  at_8 = [qdq_onnx._fit_channel(8, u[i], u[i] <= -a_max, u[i] > a_max, a_max, scale[i], shift[i], 15) for i in range(c)]
  first_failed = np.array([f is None for f in at_8])
  assert first_failed.sum() >= 5
  fit = qdq_onnx.fit_requant(scale, shift, 4, np.full(c, 15), np.full(c, a_max), 4)
  rescued = first_failed & fit.ok
  assert rescued.sum() >= 5 and np.all(np.abs(fit.k[rescued]) < 8)
  assert np.all(np.abs(fit.k[~first_failed]) == 8)
  assert_fit_equals_thresholds(fit, rescued, np.arange(-a_max, a_max + 1)[:, None], sign, u, 15)


def test_fit_requant_holds_at_the_ends_of_the_reachable_range():
  # A threshold at exactly +a_max is met by the largest accumulator, one at -a_max by every
  # one: neither is "never" or "always" in the other sense.
  rng = np.random.default_rng(3)
  c = 60
  scale, shift = rng.uniform(0.05, 0.2, c), rng.uniform(-2, 5, c)
  sign, u = integer.thresholds(scale, shift, 3)
  a_max = np.where(np.arange(c) % 2 == 0, u[:, 3], -u[:, 3]).astype(np.int64)  # U_4 = +a_max or -a_max
  a_max = np.abs(a_max)
  fit = qdq_onnx.fit_requant(scale, shift, 3, np.full(c, 7), a_max, 3)
  assert fit.ok.mean() > 0.9
  for ch in np.flatnonzero(fit.ok):
    assert_fit_equals_thresholds(fit, ch, np.arange(-a_max[ch], a_max[ch] + 1), sign, u, 7)


def test_fit_requant_with_one_multiplier_left_still_fits():
  # 7-bit weight codes (|c| up to 100): k = 127 // 100 = 1 is the only multiplier to try.
  rng = np.random.default_rng(4)
  c = 40
  scale, shift = rng.uniform(0.002, 0.01, c), rng.uniform(-2, 5, c)
  fit = qdq_onnx.fit_requant(scale, shift, 2, np.full(c, 100), np.full(c, 3000), 2)
  assert fit.ok.any() and np.all(np.abs(fit.k[fit.ok]) == 1)


def test_requant_codes_rounds_the_float32_product_as_the_kernels_do():
  # 2829 * 0.060622126 is 171.49999 in float64 but 171.5 in float32, which rounds half to even.
  m = np.float32(0.060622126)
  assert qdq_onnx.requant_codes(np.array([2829]), 0, m, 255)[0] == 172
  assert qdq_onnx.requant_codes(np.array([2829]), 0, float(m), 255)[0] == 172  # m is made float32
  assert qdq_onnx.requant_codes(np.array([2829, -5]), 0, m, 100).tolist() == [100, 0]


@pytest.mark.heavy
def test_fit_requant_keeps_int32_and_proves_its_float32_sums_on_wide_accumulators():
  # Accumulators of 12.6M: `K acc + B` must stay inside int32 (so K <= 170 here, 127 allowed),
  # and float32(K acc + B) is then a multiple of 128: the check on both sides of every
  # threshold, in the kernels' float32, rejects multipliers whose sums cross a boundary.
  rng = np.random.default_rng(5)
  c, a_max = 24, 12_600_000
  scale, shift = rng.uniform(2e-7, 6e-7, c), rng.uniform(-2, 5, c)
  sign, u = integer.thresholds(scale, shift, 2)
  fit = qdq_onnx.fit_requant(scale, shift, 2, np.full(c, 1), np.full(c, a_max), 2)
  assert fit.ok.mean() > 0.9 and (np.abs(fit.k[fit.ok]) < 127).any()  # some needed a smaller K
  assert np.all(np.abs(fit.b[fit.ok]) + np.abs(fit.k[fit.ok]) * a_max < 2**31)
  for ch in np.flatnonzero(fit.ok):
    edges = np.concatenate([u[ch] - 1, u[ch]])
    edges = edges[np.abs(edges) <= a_max]
    want = np.sum((edges * sign[ch])[:, None] >= u[ch], axis=-1)
    np.testing.assert_array_equal(qdq_onnx.requant_codes(edges * fit.k[ch], fit.b[ch], fit.m[ch], 3), want)
  # Beyond int32 at every multiplier: nothing fits.
  huge = qdq_onnx.fit_requant(scale, shift, 2, np.full(c, 1), np.full(c, 2**31), 2)
  assert not huge.ok[~np.all((u <= -2**31) | (u > 2**31), axis=1)].any()
