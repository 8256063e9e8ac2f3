"""LSQ and PACT: values and gradients against NumPy transcriptions of the papers' formulas,
the phase-boundary and full-precision rules, first-batch calibration, clip-level decay."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_joint import _batch

from configs import default
from qnet.train import build, calibration, config_validation, joint
from qnet.quant import precision, quantizers as quant
from qnet.models import layers

BITS = range(2, 9)


# ----------------------------------------------------------------------------- the papers


def lsq_numpy(v, s, g, qn, qp, n):
  """LSQ (Esser et al. 2020) in its own terms: step `s`, eqs. (1)-(5), gradient scale
  `1/sqrt(N Q_p)`. Returns (v_q, dL/dv, dL/ds) for the upstream gradient `g`; `s` is a
  scalar or one per last axis."""
  u = v / s
  vq = np.round(np.clip(u, -qn, qp)) * s
  inside = (u > -qn) & (u < qp)
  dv = g * inside
  ds_elem = np.where(inside, -u + np.round(u), np.where(u <= -qn, -qn, qp))
  axes = tuple(range(v.ndim - 1)) if np.ndim(s) else None
  ds = np.sum(g * ds_elem, axis=axes) / np.sqrt(n * qp)
  return vq, dv, ds


def pact_numpy(x, alpha, g, bits):
  """PACT (Choi et al. 2018): y = clip(x, 0, alpha), y_q = round(y n / alpha) alpha / n,
  STE round; dy_q/dx = 1 on [0, alpha), dy_q/dalpha = 1 where x >= alpha (eq. 2)."""
  n = 2.0**bits - 1
  y = np.clip(x, 0, alpha)
  yq = np.round(y * n / alpha) * alpha / n
  return yq, g * ((x >= 0) & (x < alpha)), np.sum(g * (x >= alpha))


def _rand(shape, seed, scale=1.0):
  return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


def _vjp(fn, *args):
  out, pull = jax.vjp(fn, *args)
  return out, pull


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("per_channel", [False, True])
def test_lsq_weights_match_the_paper(bits, per_channel):
  w, g = _rand((3, 3, 4, 6), bits, 0.1), _rand((3, 3, 4, 6), 100 + bits)
  qn, qp = 2.0 ** (bits - 1), 2.0 ** (bits - 1) - 1
  s = (np.linspace(0.01, 0.05, 6) if per_channel else np.array(0.02)).astype(np.float32)
  clip = jnp.asarray(s * np.sqrt(np.float32(qp)))  # qnet's parameter t = s sqrt(Q_p)
  out, pull = _vjp(lambda w, c: quant.lsq_quantize(w, c, bits, signed=True), jnp.asarray(w), clip)
  dw, dclip = pull(jnp.asarray(g))
  n = w.size / (6 if per_channel else 1)
  vq, dv, ds = lsq_numpy(w, np.asarray(clip) / np.sqrt(np.float32(qp)), g, qn, qp, n)
  np.testing.assert_allclose(out, vq, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(dw, dv)
  # One SGD step on t moves s = t / sqrt(Q_p) exactly as LSQ's step on s: dL/dt = sqrt(Q_p) dL/ds.
  np.testing.assert_allclose(dclip, np.sqrt(qp) * ds, rtol=2e-5, atol=1e-6)
  assert dclip.shape == clip.shape
  per = np.asarray(out).reshape(-1, 6)
  assert max(len(np.unique(per[:, c] if per_channel else per)) for c in range(6)) <= 2**bits


@pytest.mark.parametrize("bits", BITS)
def test_lsq_activations_match_the_paper(bits):
  x, g = _rand((5, 4, 4, 3), bits, 2.0), _rand((5, 4, 4, 3), 50 + bits)
  qp = 2.0**bits - 1
  clip = jnp.float32(3.0)
  out, pull = _vjp(lambda x, c: quant.lsq_quantize(x, c, bits, signed=False), jnp.asarray(x), clip)
  dx, dclip = pull(jnp.asarray(g))
  # N is LSQ's N_F: the features of one example.
  s = np.float32(3.0) / np.sqrt(np.float32(qp))
  vq, dv, ds = lsq_numpy(x, s, g, 0.0, qp, 4 * 4 * 3)
  np.testing.assert_allclose(out, vq, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(dx, dv)
  np.testing.assert_allclose(dclip, np.sqrt(qp) * ds, rtol=2e-5, atol=1e-6)
  top = min(qp, np.round(np.max(x) / s))  # the largest code the data reaches
  assert np.asarray(out).min() == 0 and np.isclose(np.asarray(out).max(), top * s, rtol=1e-6)


@pytest.mark.parametrize("bits", BITS)
def test_pact_matches_the_paper(bits):
  x, g = _rand((6, 5, 5, 2), bits, 2.0), _rand((6, 5, 5, 2), 70 + bits)
  alpha = jnp.float32(1.7)
  out, pull = _vjp(lambda x, a: quant.pact_quantize(x, a, bits), jnp.asarray(x), alpha)
  dx, dalpha = pull(jnp.asarray(g))
  yq, dxr, dar = pact_numpy(x, np.float32(1.7), g, bits)
  np.testing.assert_allclose(out, yq, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(dx, dxr)
  np.testing.assert_allclose(dalpha, dar, rtol=1e-5)


def test_full_precision_is_raw_weights_and_relu_and_leaves_the_clip_level_alone():
  x = jnp.array([-2.0, -0.1, 0.3, 5.0])
  for fn, signed in ((quant.lsq_quantize, True), (quant.lsq_quantize, False), (None, False)):
    f = (
      (lambda x, c: quant.pact_quantize(x, c, 32))
      if fn is None
      else (lambda x, c, s=signed: quant.lsq_quantize(x, c, 32, signed=s))
    )
    out, pull = jax.vjp(f, x, jnp.float32(1.0))
    dx, dclip = pull(jnp.ones(4))
    want = x if signed else jnp.maximum(x, 0)
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(dx, [1, 1, 1, 1] if signed else [0, 0, 1, 1])
    assert float(dclip) == 0.0


@pytest.mark.parametrize("old,new", [(8, 4), (4, 2), (3, 2)])
def test_phase_boundary_keeps_t_and_the_step_follows_lsqs_init_rule(old, new):
  """The documented rule: the parameter t is untouched at a boundary; the step is
  t / sqrt(Q_p(bits)), i.e. LSQ's step rescaled by sqrt(Q_p(old) / Q_p(new)), as LSQ's
  initialisation 2 mean|v| / sqrt(Q_p) would rescale it."""
  t = jnp.float32(0.3)
  x = jnp.linspace(-40.0, 40.0, 80001)  # wide enough to reach every level at 8 bits
  for signed in (True, False):
    qn = lambda b: 2.0 ** (b - 1) if signed else 0.0
    qp = lambda b: 2.0 ** (b - 1) - 1 if signed else 2.0**b - 1
    levels = {}
    for b in (old, new):
      q = np.unique(np.asarray(quant.lsq_quantize(x, t, b, signed=signed)))
      step = np.diff(q)
      s = 0.3 / np.sqrt(qp(b))
      np.testing.assert_allclose(step, s, rtol=1e-3)
      np.testing.assert_allclose([q.min(), q.max()], [-qn(b) * s, qp(b) * s], rtol=1e-5)
      levels[b] = step[0]
    np.testing.assert_allclose(levels[new] / levels[old], np.sqrt(qp(old) / qp(new)), rtol=1e-3)
  for b in (old, new):  # PACT's alpha is already bits-independent: top level alpha.
    assert np.isclose(np.asarray(quant.pact_quantize(x, t, b)).max(), 0.3)


def test_bits_are_data_for_learned_quantizers():
  traces = []

  @jax.jit
  def f(x, c, bits):
    traces.append(1)
    return (
      quant.lsq_quantize(x, c, bits, signed=True).sum()
      + quant.lsq_quantize(x, c, bits, signed=False).sum()
      + quant.pact_quantize(x, c, bits).sum()
    )

  x = jnp.linspace(-1, 2, 16)
  outs = {b: float(f(x, jnp.float32(1.3), jnp.float32(b))) for b in (32, 8, 4, 2)}
  assert len(traces) == 1 and len(set(outs.values())) == 4


def test_lsq_init_is_lsqs_initial_step_at_every_bit_width():
  """`t = 2 mean|v|`, so `lsq_step(t, bits)` is LSQ's `2 mean|v| / sqrt(Q_p)` at any bits."""
  w = _rand((3, 3, 2, 4), 0)
  t = quant.lsq_init_clip(jnp.asarray(w), True)
  per = quant.lsq_init_clip(jnp.asarray(w), True, axes=(0, 1, 2))
  ta = quant.lsq_init_clip(jnp.asarray(w), False)
  for bits in (2, 4, 8):
    qp, qa = 2.0 ** (bits - 1) - 1, 2.0**bits - 1
    want = 2 * np.abs(w).mean() / np.sqrt(qp)
    np.testing.assert_allclose(quant.lsq_step(t, bits, True), want, rtol=1e-5)
    want = 2 * np.abs(w).mean(axis=(0, 1, 2)) / np.sqrt(qp)
    np.testing.assert_allclose(quant.lsq_step(per, bits, True), want, rtol=1e-5)
    want = 2 * np.maximum(w, 0).mean() / np.sqrt(qa)
    np.testing.assert_allclose(quant.lsq_step(ta, bits, False), want, rtol=1e-5)


def test_pact_init_alpha_is_the_clip_level_of_lsqs_initial_step():
  x = _rand((4, 5, 5, 3), 1, 2.0)
  for bits in (2, 4, 8):
    qp = 2.0**bits - 1
    want = qp * 2 * np.maximum(x, 0).mean() / np.sqrt(qp)
    np.testing.assert_allclose(quant.pact_init_alpha(jnp.asarray(x), bits), want, rtol=1e-5)


# ----------------------------------------------------------------------------- in a network


def _config(weight_quantizer="lsq", act_quantizer="lsq", model="tiny_cnn", **over):
  c = default.get_config()
  c.model = model
  c.quant.weight_quantizer, c.quant.act_quantizer = weight_quantizer, act_quantizer
  c.quant.weight_bits = c.quant.act_bits = 2
  c.update_from_flattened_dict(over)
  return c


def _layer_inputs(model, variables, images):
  """Each quantized layer's input and kernel in a training-mode forward (interceptor)."""

  def run(variables, images):
    seen = {}

    def grab(next_fun, args, kwargs, context):
      m = context.module
      if context.method_name == "__call__" and isinstance(m, (layers.QuantConv, layers.QuantDense)):
        seen["/".join(m.scope.path)] = (args[0], m.variables["params"]["kernel"])
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(grab):
      model.apply(variables, images, train=True, mutable=["batch_stats"])
    return seen

  return jax.jit(run)(variables, images)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.heavy
def test_first_batch_calibration_sets_lsq_initial_steps_in_order(per_channel):
  c = _config(
    model="tiny_resnet",
    **{"quant.per_channel": per_channel, "quant.weight_bits": 3, "quant.act_bits": 4},
  )
  (spec,), _ = build.build_specs(c, 10)
  state = joint.init_state((spec,), None, 0, jnp.zeros((1, 28, 28, 1)))
  batch = _batch(16)
  cal = jax.jit(functools.partial(calibration.calibrate, students=(spec,)))(state, batch)
  params = cal.students[0].params
  prec = precision.uniform(spec.layout, 3, 4)
  variables = {"params": params, "batch_stats": cal.students[0].batch_stats, "precision": prec}
  # With every level calibrated, a forward sees exactly what the calibration pass saw.
  seen = _layer_inputs(spec.model, variables, batch["image"])
  inner = [p for p in seen if p not in ("stem", "head")]
  assert len(inner) == 5  # two blocks of two convs and a projection shortcut
  for path in inner:
    x, kernel = seen[path]
    node = functools.reduce(lambda d, k: d[k], path.split("/"), params)
    want_a = 2 * np.maximum(np.asarray(x), 0).mean()  # t = 2 mean|v|: s = t / sqrt(Q_p)
    np.testing.assert_allclose(node["act_clip"], want_a, rtol=1e-4)
    axes = (0, 1, 2) if per_channel else None
    want_w = 2 * np.abs(np.asarray(kernel)).mean(axis=axes)
    np.testing.assert_allclose(node["weight_clip"], want_w, rtol=1e-5)
  # Layers kept at full precision (stem, head) keep their level; BN statistics untouched.
  for name in ("stem", "head"):
    np.testing.assert_array_equal(
      params[name]["weight_clip"], state.students[0].params[name]["weight_clip"]
    )
  for a, b in zip(
    jax.tree.leaves(cal.students[0].batch_stats), jax.tree.leaves(state.students[0].batch_stats)
  ):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
  "act_quantizer,clip_decay,want_w,want_a",
  [("lsq", -1.0, 0.0, 0.0), ("pact", -1.0, 0.0, 1e-4), ("pact", 0.01, 0.01, 0.01)],
)
def test_weight_decay_reaches_clip_levels_only_as_configured(
  act_quantizer, clip_decay, want_w, want_a
):
  c = _config(act_quantizer=act_quantizer, **{"quant.clip_decay": clip_decay})
  (spec,), _ = build.build_specs(c, 10)
  params = joint.init_net(spec, jax.random.key(0, impl="rbg"), jnp.zeros((1, 28, 28, 1))).params
  params = jax.tree.map(lambda p: p + 1.0, params)  # no zero leaves
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = spec.tx.update(zero, spec.tx.init(params), params)
  conv = "conv2_1"
  np.testing.assert_allclose(updates[conv]["kernel"], 1e-4 * params[conv]["kernel"], rtol=1e-6)
  np.testing.assert_allclose(updates[conv]["weight_clip"], want_w * params[conv]["weight_clip"])
  np.testing.assert_allclose(updates[conv]["act_clip"], want_a * params[conv]["act_clip"])
  np.testing.assert_array_equal(updates["conv2_1_bn"]["scale"], 0.0)


@pytest.mark.parametrize(
  "over,message",
  [
    (
      {"quant.weight_quantizer": "pact"},
      (
        "config.quant.weight_quantizer='pact' is invalid; allowed: dorefa, lsq "
        "(PACT clips activations only)"
      ),
    ),
    (
      {"quant.act_quantizer": "lsqq"},
      "config.quant.act_quantizer='lsqq' is invalid; allowed: dorefa, pact, lsq",
    ),
    (
      {"quant.weight_quantizer": "lsq", "quant.weight_bits": 1},
      "config.quant.weight_bits=1 is invalid; allowed: 2..16 or 32 with quant.weight_quantizer='lsq'",
    ),
    (
      {"quant.weight_quantizer": "lsq", "schedule.phases": ((0, 4, 4), (5, 1, 2))},
      "config.schedule.phases[1].weight_bits=1 is invalid",
    ),
    ({"quant.clip_decay": -0.5}, "config.quant.clip_decay=-0.5 is invalid"),
  ],
)
def test_config_validation_of_quantizer_fields(over, message):
  c = default.get_config()
  c.update_from_flattened_dict(over)
  with pytest.raises(
    config_validation.ConfigError,
    match=re.escape(message),
  ):
    config_validation.validate(c, 1, reference=default.get_config())


def _trainer(c, total):
  students, teacher = build.build_specs(c, total)
  state = joint.init_state(students, teacher, c.seed, jnp.zeros((1, 28, 28, 1)))
  step = jax.jit(
    functools.partial(
      joint.train_step, students=students, teacher=teacher, distill=build.distill_spec(c)
    )
  )
  calibrate = jax.jit(functools.partial(calibration.calibrate, students=students))
  return students, teacher, state, step, calibrate


@pytest.mark.parametrize("act_quantizer", ["lsq", "pact"])
@pytest.mark.heavy
def test_one_compile_over_progressive_stochastic_distillation(act_quantizer):
  c = _config(
    act_quantizer=act_quantizer,
    **{
      "schedule.kind": "progressive+stochastic",
      "distill.enabled": True,
      "distill.extra_students": ((4, 4),),
      "quant.clip_decay": 0.0,
    },
  )
  _, _, state, step, calibrate = _trainer(c, 24)
  state = calibrate(state, _batch())
  start = state
  before = joint.TRACE_COUNTS["train_step"]
  bits = set()
  for i in range(24):
    state, m = step(state, _batch(seed=i % 3))
    bits.add((float(m["weight_bits"]), float(m["act_bits"])))
  assert joint.TRACE_COUNTS["train_step"] - before == 1 and step._cache_size() == 1
  assert {(32, 32), (8, 8), (4, 4), (2, 2)} <= bits
  assert all(np.isfinite(float(v)) for v in m.values())
  # Students learn their clip levels (PACT's alpha moves only once inputs reach it, which
  # 24 steps need not bring); the FP teacher never uses (nor moves) its own.
  learned = ("weight_clip", "act_clip") if act_quantizer == "lsq" else ("weight_clip",)
  for s in (0, 1):
    for name in learned:
      now, then = (
        state.students[s].params["conv2_1"][name],
        start.students[s].params["conv2_1"][name],
      )
      assert not np.allclose(now, then), (s, name)
  for name in ("weight_clip", "act_clip"):
    np.testing.assert_array_equal(
      state.teacher.params["conv2_1"][name], start.teacher.params["conv2_1"][name]
    )


@pytest.mark.parametrize(
  "weight_quantizer,act_quantizer", [("lsq", "lsq"), ("lsq", "pact"), ("dorefa", "pact")]
)
@pytest.mark.heavy
def test_short_training_with_each_quantizer_reduces_the_loss(weight_quantizer, act_quantizer):
  c = _config(weight_quantizer, act_quantizer, learning_rate=0.05)
  _, _, state, step, calibrate = _trainer(c, 30)
  batch = _batch(32)
  state = calibrate(state, batch)
  losses = []
  for _ in range(30):
    state, m = step(state, batch)
    losses.append(float(m["train_loss"]))
  assert losses[-1] < 0.5 * losses[0], losses


# ----------------------------------------------------------------------------- the loop


@pytest.mark.slow
def test_loop_calibrates_fresh_runs_only_and_resumes_exactly(tmp_path, monkeypatch):
  from test_loop import mock_config, run, saved_state

  calls = []  # the loop's calibrations: one per fresh run, none on resuming
  compile_calibrate = calibration.compile_calibrate
  monkeypatch.setattr(
    calibration, "compile_calibrate", lambda *a: calls.append(a) or compile_calibrate(*a)
  )

  c = mock_config(
    **{
      "quant.weight_quantizer": "lsq",
      "quant.act_quantizer": "pact",
      "schedule.kind": "progressive",
    }
  )
  run(c, tmp_path / "full")
  assert len(calls) == 1
  run(c, tmp_path / "split", stop_at_step=5)
  assert len(calls) == 2
  run(c, tmp_path / "split")  # resumed: no second calibration
  assert len(calls) == 2
  (_, a), (_, b) = saved_state(c, tmp_path / "full"), saved_state(c, tmp_path / "split")
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  # The loop calibrated: PACT's alpha left DoReFa's placeholder 1.
  assert float(a.students[0].params["conv2_1"]["act_clip"]) != 1.0


def test_init_from_a_dorefa_checkpoint_keeps_fresh_clip_levels(tmp_path):
  from qnet.train import checkpointing, loop

  def state_of(c):
    students, teacher = build.build_specs(c, 10)
    init = jax.jit(functools.partial(joint.init_state, students, teacher, c.seed))
    return init(jnp.zeros((1, 28, 28, 1)))

  dorefa = state_of(_config("dorefa", "dorefa", seed=3))
  assert "act_clip" not in dorefa.students[0].params["conv2_1"]
  manager = checkpointing.create_manager(str(tmp_path))
  checkpointing.save(manager, 1, dorefa, {})
  manager.wait_until_finished()
  fresh = state_of(_config("lsq", "pact"))
  loaded = loop.load_students_from(str(tmp_path), fresh, teacher_too=False).students[0].params
  np.testing.assert_array_equal(
    loaded["conv2_1"]["kernel"], dorefa.students[0].params["conv2_1"]["kernel"]
  )
  for name in ("weight_clip", "act_clip"):
    np.testing.assert_array_equal(
      loaded["conv2_1"][name], fresh.students[0].params["conv2_1"][name]
    )


def test_calibrate_if_fresh_calibrates_a_fresh_run_on_its_first_batch_only():
  from qnet.train import loop

  c = _config(act_quantizer="pact")
  students, _ = build.build_specs(c, 10)
  state = joint.init_state(students, None, 0, jnp.zeros((1, 28, 28, 1)))
  mesh = build.create_mesh()
  batches = [_batch(16, seed=s) for s in range(3)]
  want = calibration.calibrate(state, batches[0], students=students).students[0].params

  fresh, rest = loop.calibrate_if_fresh(c, state, iter(batches), mesh, students)
  got = fresh.students[0].params
  # Every level is the first batch's calibration (not the placeholder, not another batch's),
  # and that batch is still the first one trained on.
  for name in ("act_clip", "weight_clip"):  # conv2_1: tiny_cnn's one quantized layer
    np.testing.assert_allclose(got["conv2_1"][name], want["conv2_1"][name], rtol=1e-6)
  # (LSQ's weight step is data-free, already right at init; PACT's alpha is data's.)
  placeholder = state.students[0].params["conv2_1"]["act_clip"]
  assert not np.allclose(want["conv2_1"]["act_clip"], placeholder)
  assert [id(b) for b in rest] == [id(b) for b in batches]

  # A resumed run (step > 0) and a DoReFa run keep their state and consume no batch; a
  # plain FP network (model_act relu) has no clip levels to calibrate.
  assert not calibration.learned_clips(_config(model_act="relu"))
  stream = _config("dorefa", "dorefa")
  stream.quant.residual_bits = 8  # DoReFa layers, but the int8 stream's steps are learned
  assert calibration.learned_clips(stream)
  resumed = state.replace(step=jnp.int32(5))
  for config, start in ((c, resumed), (_config("dorefa", "dorefa"), state)):
    kept, rest = loop.calibrate_if_fresh(config, start, iter(batches), mesh, students)
    assert kept is start
    assert [id(b) for b in rest] == [id(b) for b in batches]
