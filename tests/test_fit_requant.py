"""`qnet.deploy.qdq_onnx.fit_requant`: the fused int8 kernels' requantization (`K`, `B`, `M`
per channel) equals qnet's integer thresholds on every reachable accumulator. Pure numpy and
fast: the module mutation testing runs the fit against (`tools/mutation.py --tests`)."""

import numpy as np

from qnet.deploy import integer, qdq_onnx


def test_fit_requant_equals_the_thresholds_on_every_reachable_accumulator():
  rng = np.random.default_rng(0)
  for bits, in_bits, max_w in ((2, 2, 3), (4, 4, 15), (3, 8, 7), (4, 4, 8)):
    c = 40
    scale = rng.uniform(0.01, 0.3, c) * rng.choice([-1, 1], c)
    scale[0] = 0.0  # a constant channel
    shift = rng.uniform(-3, integer.levels(bits) + 3, c)
    a_max = np.full(c, 300)
    fit = qdq_onnx.fit_requant(scale, shift, bits, np.full(c, max_w), a_max, in_bits)
    assert fit.ok.mean() > 0.8, (bits, fit.ok.mean())
    acc = np.arange(-300, 301)[:, None]
    sign, u = integer.thresholds(scale, shift, bits)
    want = np.sum((acc * sign)[..., None] >= u, axis=-1)
    got = qdq_onnx.requant_codes(acc * fit.k, fit.b, fit.m, integer.levels(bits))
    np.testing.assert_array_equal(got[:, fit.ok], want[:, fit.ok])
    assert np.all(np.abs(fit.k[fit.ok][1:]) * max_w <= (64 if in_bits == 8 else 127))


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
  acc = np.arange(-a_max, a_max + 1)[:, None]
  want = np.sum((acc * sign[rescued])[..., None] >= u[rescued], axis=-1)
  got = qdq_onnx.requant_codes(acc * fit.k[rescued], fit.b[rescued], fit.m[rescued], 15)
  np.testing.assert_array_equal(got, want)
