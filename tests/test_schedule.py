"""Precision schedules: phases, boundaries, stochastic precision statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from qnet import models
from qnet.quant import precision, schedule


def _cfg(kind, **kw):
  s = default.get_config().schedule
  s.kind = kind
  for k, v in kw.items():
    s[k] = v
  return s


def _layout(name="tiny_resnet"):
  return precision.layout_of(models.create_model(name, 10), jnp.zeros((1, 28, 28, 1)))


def _bits_at(sched, step):
  w, a = sched.phase_bits(jnp.int32(step))
  return float(w), float(a)


def test_direct_and_two_stage_defaults():
  d = schedule.from_config(_cfg("direct"), 2, 2, 1000, True)
  assert d.starts == (0,) and _bits_at(d, 999) == (2, 2)
  ts = schedule.from_config(_cfg("two_stage"), 2, 2, 1000, True)
  assert ts.starts == (0, 500)
  assert [_bits_at(ts, s) for s in (0, 499, 500, 999)] == [(2, 32), (2, 32), (2, 2), (2, 2)]


def test_progressive_ladder_and_its_boundaries():
  p = schedule.from_config(_cfg("progressive"), 2, 2, 1000, True)
  assert p.starts == (0, 250, 500, 750)
  expected = {
    0: (32, 32),
    249: (32, 32),
    250: (8, 8),
    499: (8, 8),
    500: (4, 4),
    749: (4, 4),
    750: (2, 2),
    999: (2, 2),
  }
  assert {s: _bits_at(p, s) for s in expected} == expected
  cvpr = schedule.from_config(_cfg("progressive", ladder=(32, 16, 8, 4, 2)), 2, 2, 1000, True)
  assert cvpr.weight_bits == (32, 16, 8, 4, 2)


def test_progressive_with_two_stage_drops_weights_first():
  p = schedule.from_config(_cfg("progressive+two_stage"), 4, 4, 900, True)
  # stages 32 | 8 | 4, each 300 steps; inside 8 and 4 the weights drop first.
  assert p.starts == (0, 300, 450, 600, 750)
  assert list(zip(p.weight_bits, p.act_bits)) == [(32, 32), (8, 32), (8, 8), (4, 8), (4, 4)]


def test_explicit_phases_as_fractions_or_steps():
  p = schedule.from_config(
    _cfg("direct", phases=((0, 8, 32), (0.25, 8, 8), (600, 2, 2))), 2, 2, 1000, True
  )
  assert p.starts == (0, 250, 600)
  with pytest.raises(ValueError, match="strictly increase"):
    schedule.from_config(
      _cfg("direct", phases=((0, 8, 8), (0.8, 4, 4), (500, 2, 2))), 2, 2, 1000, True
    )


def test_precision_tree_at_boundaries_keeps_edges_fp():
  layout = _layout()
  p = schedule.from_config(_cfg("two_stage"), 2, 2, 100, True)
  for step, (w, a) in [(49, (2, 32)), (50, (2, 2))]:
    tree = p.deterministic(layout, jnp.int32(step))
    assert float(tree["stage1_block1"]["conv1"]["weight_bits"]) == w
    assert float(tree["stage1_block1"]["conv2"]["act_bits"]) == a
    assert float(tree["stem"]["weight_bits"]) == 32 and float(tree["head"]["act_bits"]) == 32
  no_keep = schedule.from_config(_cfg("direct"), 2, 2, 100, False)
  assert float(no_keep.deterministic(layout, jnp.int32(0))["head"]["weight_bits"]) == 2


def test_layout_vectors_invert_tree():
  """`Layout.vectors` reads back, layer by layer in `paths` order, what `Layout.tree` built."""
  layout = _layout()
  n = len(layout.paths)
  w, a = jnp.arange(n, dtype=jnp.float32) + 2, jnp.arange(n, dtype=jnp.float32)[::-1] + 1
  got_w, got_a = layout.vectors(layout.tree(w, a))
  np.testing.assert_array_equal(got_w, w)
  np.testing.assert_array_equal(got_a, a)


def test_sp_ratio_step_list_and_linear_ramp():
  s = schedule.from_config(_cfg("stochastic"), 2, 2, 400, True)
  assert [float(s.sp_ratio(jnp.int32(t))) for t in (0, 99, 100, 200, 300, 399)] == [
    0.5,
    0.5,
    0.75,
    0.875,
    1.0,
    1.0,
  ]
  lin = schedule.from_config(_cfg("stochastic", sp_ramp="linear"), 2, 2, 400, True)
  r = [float(lin.sp_ratio(jnp.int32(t))) for t in (0, 150, 300, 399)]
  assert r[0] == 0.5 and 0.5 < r[1] < 1 and r[2] == r[3] == 1.0


@pytest.mark.parametrize(
  "unit,ratio", [("layer", 0.5), ("layer", 0.75), ("block", 0.5), ("block", 0.875)]
)
@pytest.mark.heavy
def test_stochastic_fraction_within_three_standard_errors(unit, ratio):
  layout = _layout("resnet20")
  draws = 400
  keys = jax.random.split(jax.random.key(0, impl="rbg"), draws)
  masks, fractions = jax.vmap(lambda k: precision.stochastic_mask(k, ratio, layout, unit))(keys)
  _, num_units = layout.unit_ids(unit)
  eligible = num_units - 2  # stem and head are their own units and never sampled
  se = np.sqrt(ratio * (1 - ratio) / (draws * eligible))
  assert abs(float(np.mean(fractions)) - ratio) < 3 * se
  assert not np.any(np.asarray(masks)[:, layout.edge_mask()])


def test_block_unit_quantizes_a_whole_block_together():
  layout = _layout("resnet20")
  ids, _ = layout.unit_ids("block")
  mask, _ = precision.stochastic_mask(jax.random.key(3, impl="rbg"), 0.5, layout, "block")
  mask = np.asarray(mask)
  for u in np.unique(ids):
    assert len(set(mask[ids == u])) == 1


def _apply(model, v, prec, x):
  return model.apply(
    {"params": v["params"], "batch_stats": v["batch_stats"], "precision": prec}, x, train=False
  )


@pytest.mark.parametrize("separate", [False, True])
def test_ratio_one_is_fully_quantized_and_ratio_zero_is_full_precision(separate):
  model = models.create_model("tiny_resnet", 10)
  x = jax.random.normal(jax.random.key(1, impl="rbg"), (2, 28, 28, 1))
  v = model.init(jax.random.key(0, impl="rbg"), x, train=False)
  layout = precision.layout_of(model, x)
  for ratios, target in [
    ((1.0,), precision.uniform(layout, 2, 2)),
    ((0.0,), precision.uniform(layout, 32, 32)),
  ]:
    s = schedule.Schedule(
      starts=(0,),
      weight_bits=(2.0,),
      act_bits=(2.0,),
      total_steps=10,
      stochastic=True,
      sp_ratios=ratios,
      sp_separate=separate,
    )
    prec, frac = s.sample(layout, jnp.int32(3), jax.random.key(7, impl="rbg"))
    np.testing.assert_array_equal(_apply(model, v, prec, x), _apply(model, v, target, x))
    assert float(frac) == ratios[0]


def test_bad_kinds_are_rejected():
  for kind in ("direct+progressive", "progresive", ""):
    with pytest.raises(ValueError, match="schedule.kind"):
      schedule.parse_kind(kind)
