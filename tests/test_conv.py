"""qnet.platform.conv: equal to the stock conv, and the CPU speed fixes are really compiled in."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from qnet.platform import conv as qconv

CPU = jax.default_backend() == "cpu"
needs_cpu = pytest.mark.skipif(not CPU, reason="CPU-only code path")
# From jaxlib 0.12 YNNPACK leaves some convolutions to oneDNN; on 0.10 it claims them all.
ONEDNN_TAKES = tuple(qconv.jaxlib_version.__version_info__[:2]) >= (0, 12)
CASES = [(k, s, p) for k in (1, 3) for s in (1, 2) for p in ("SAME", "VALID")]


def jit(fun):
  """`jax.jit` with the compiler options the training steps get (build.compile_steps)."""
  return jax.jit(fun, compiler_options=qconv.cpu_compiler_options() or None)


def stock(x, k, strides=(1, 1), padding="SAME"):
  return lax.conv_general_dilated(
    x, k, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def data(ksize, cin=5, cout=7, seed=0):
  kx, kk, kw = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (4, 9, 9, cin))  # odd size: asymmetric SAME padding at stride 2
  k = jax.random.normal(kk, (ksize, ksize, cin, cout)) * 0.3
  return x, k, kw


@pytest.mark.parametrize("ksize,s,pad", CASES)
def test_forward_equal(ksize, s, pad):
  x, k, _ = data(ksize)
  opts = qconv.cpu_compiler_options()
  got = jax.jit(lambda x, k: qconv.conv(x, k, strides=(s, s), padding=pad), compiler_options=opts)(
    x, k
  )
  want = jax.jit(lambda x, k: stock(x, k, (s, s), pad), compiler_options=opts)(x, k)
  diff = float(jnp.max(jnp.abs(got - want)))
  print(f"forward k={ksize} s={s} {pad}: max|diff|={diff}")
  assert got.shape == want.shape and diff == 0.0
  eager = qconv.conv(x, k, strides=(s, s), padding=pad)
  assert float(jnp.max(jnp.abs(eager - stock(x, k, (s, s), pad)))) == 0.0


@pytest.mark.parametrize("ksize,s,pad", CASES + [(3, 2, ((1, 0), (0, 2)))])
def test_gradients_equal(ksize, s, pad):
  x, k, kw = data(ksize)
  w = jax.random.normal(kw, stock(x, k, (s, s), pad).shape)

  def grads(fn):
    loss = lambda x, k: jnp.sum(jax.nn.relu(fn(x, k, (s, s), pad)) * w)
    return jit(jax.grad(loss, argnums=(0, 1)))(x, k)

  got = grads(lambda x, k, st, p: qconv.conv(x, k, strides=st, padding=p))
  want = grads(stock)
  dx, dk = (float(jnp.max(jnp.abs(a - b))) for a, b in zip(got, want))
  print(f"grad k={ksize} s={s} {pad}: max|dx diff|={dx} max|dk diff|={dk}")
  assert dk == 0.0
  if CPU and qconv.subpixel_applies(k.shape[:2], (s, s), pad):
    # Sub-pixel input gradient: same sums in another order.
    assert dx < 1e-5 * float(jnp.max(jnp.abs(want[0])))
  else:
    assert dx == 0.0


SUBPIXEL_CASES = [
  ((9, 10), 3, 2, "SAME"),  # odd/even sizes: asymmetric SAME pads, rows and columns differ
  ((9, 9), 3, 2, "VALID"),
  ((8, 8), 3, 2, ((1, 0), (0, 2))),
  ((10, 11), 5, 3, "SAME"),  # stride 3: nine phases
  ((7, 7), 2, 2, "VALID"),  # kernel == stride: every phase one tap
  ((8, 8), 1, 2, "SAME"),  # kernel < stride: not rewritten, stock path
]


@pytest.mark.parametrize("hw,ksize,s,pad", SUBPIXEL_CASES)
@pytest.mark.heavy
def test_subpixel_input_grad_equals_stock(hw, ksize, s, pad):
  kx, kk, kg = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(kx, (3, *hw, 5))
  k = jax.random.normal(kk, (ksize, ksize, 5, 7))
  y, vjp = jax.vjp(lambda a: stock(a, k, (s, s), pad), x)
  g = jax.random.normal(kg, y.shape)
  want = vjp(g)[0]
  if qconv.subpixel_applies(k.shape[:2], (s, s), pad):
    got = qconv.subpixel_input_grad(g, k, hw, (s, s), pad)
    diff = float(jnp.max(jnp.abs(got - want)))
    print(f"sub-pixel dx {hw} k={ksize} s={s} {pad}: max|diff|={diff}")
    assert got.shape == want.shape and diff < 1e-5 * float(jnp.max(jnp.abs(want)))
  else:
    assert ksize < s
  # Through the custom VJP, with and without the barrier: dx as above, dk bitwise stock.
  for barrier in (False, True):
    f = lambda a, b: qconv.custom_conv(
      a, b, strides=(s, s), padding=pad, barrier=barrier, subpixel=True
    )
    out, vjp_c = jax.vjp(f, x, k)
    dx, dk = vjp_c(g)
    assert float(jnp.max(jnp.abs(out - y))) == 0.0
    assert float(jnp.max(jnp.abs(dx - want))) < 1e-5 * float(jnp.max(jnp.abs(want)))
    dk_want = jax.vjp(lambda b: stock(x, b, (s, s), pad), k)[1](g)[0]
    assert float(jnp.max(jnp.abs(dk - dk_want))) == 0.0


@needs_cpu
def test_nan_input_still_identity():
  # The cond predicate (a == a) | (a != a) must hold when a is NaN too.
  x, k, _ = data(3)
  x = x.at[0, 0, 0, 0].set(jnp.nan)
  g = lambda fn: jit(jax.grad(lambda x, k: jnp.sum(fn(x, k)), argnums=(0, 1)))(x, k)
  for a, b in zip(g(qconv.conv), g(stock)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---- compiled HLO checks -------------------------------------------------------------


def _computations(hlo: str) -> dict[str, str]:
  """Name -> body of every computation in an HLO module's text."""
  comps = {}
  for m in re.finditer(r"^(?:ENTRY )?%?([\w.\-]+) .*?\{\n(.*?)^\}", hlo, re.M | re.S):
    comps[m.group(1)] = m.group(2)
  return comps


def ynn_wrapped_convs(hlo: str) -> int:
  """Number of __ynn_fusion instructions whose fused computation holds a convolution."""
  comps, n = _computations(hlo), 0
  for line in hlo.splitlines():
    if '"__ynn_fusion"' in line and (m := re.search(r"calls=%([\w.\-]+)", line)):
      n += "convolution(" in comps.get(m.group(1), "")
  return n


def refused_conv_operands(hlo: str) -> int:
  """Convolution operands that are layout-transpose fusions of more than one input.

  A pure layout copy has one input; more means XLA re-fused (and recomputes) the
  BN/ReLU/residual chain into the transpose in front of a kernel-gradient conv.
  """
  comps, defs = _computations(hlo), {}
  for m in re.finditer(
    r"^\s+(?:ROOT )?%([\w.\-]+) = .*? ([a-z][\w\-]*)\(([^)]*)\)(.*)$", hlo, re.M
  ):
    args = [a.strip().lstrip("%") for a in re.sub(r"/\*.*?\*/", "", m.group(3)).split(",")]
    called = re.search(r"calls=%([\w.\-]+)", m.group(4))
    defs[m.group(1)] = (
      m.group(2),
      [a for a in args if a],
      comps.get(called.group(1), "") if called else "",
    )
  n = 0
  for op, args, _ in defs.values():
    if op == "convolution":
      for a in args:
        aop, aargs, body = defs.get(a, ("", [], ""))
        n += aop == "fusion" and len(aargs) > 1 and "transpose(" in body
  return n


def train_like_hlo(conv_fn, compiler_options):
  """Compiled HLO of grad(conv -> BN-like -> relu -> conv -> loss)."""

  def net(p, x):
    h = conv_fn(x, p["k1"])
    m, v = h.mean((0, 1, 2)), h.var((0, 1, 2))
    h = jax.nn.relu((h - m) * lax.rsqrt(v + 1e-5) * p["s"] + p["b"])
    return jnp.mean(conv_fn(h, p["k2"]) ** 2)

  p = dict(
    k1=jnp.full((3, 3, 3, 32), 0.1),
    k2=jnp.full((3, 3, 32, 32), 0.01),
    s=jnp.ones(32),
    b=jnp.zeros(32),
  )
  x = jnp.ones((8, 16, 16, 3))
  f = jax.jit(jax.grad(net), compiler_options=compiler_options or None)
  return f.lower(p, x).compile().as_text()


def _summary(name, hlo):
  print(
    f"{name}: conditional={'conditional(' in hlo} "
    f"ynn-wrapped convs={ynn_wrapped_convs(hlo)} "
    f"convs fed by re-fused transposes={refused_conv_operands(hlo)}"
  )


@needs_cpu
def test_hlo_has_barrier_and_no_ynn_conv(monkeypatch):
  monkeypatch.delenv("QNET_CPU_CONV_BARRIER", raising=False)
  opts = dict(qconv.CPU_CONV_OPTIONS)  # what they do, whether or not this jaxlib gets them
  default_hlo = train_like_hlo(stock, {})
  options_hlo = train_like_hlo(stock, opts)
  hlo = train_like_hlo(qconv.conv, opts)
  for name, text in [("stock, default", default_hlo), ("stock, cpu", options_hlo), ("qnet", hlo)]:
    _summary(f"{name} options", text)
  # Cause 1: by default XLA hands convolutions to YNNPACK; the options take them all back.
  # (If the first assert fails, a jaxlib upgrade changed the default: re-measure the fix.)
  assert ynn_wrapped_convs(default_hlo) > 0
  assert ynn_wrapped_convs(options_hlo) == 0 and ynn_wrapped_convs(hlo) == 0
  # Cause 2: with the options alone, convs read a re-fused BN/ReLU chain; the barrier
  # (a conditional) makes each conv read plain layout copies instead.
  assert refused_conv_operands(options_hlo) > 0
  assert "conditional(" in hlo and "convolution(" in hlo
  assert refused_conv_operands(hlo) == 0


def _conv_count(fn, s=2):
  """conv_general_dilated ops in the jaxpr of a stride-s 3x3 conv's gradient."""
  x, k, _ = data(3)
  loss = lambda x, k: jnp.sum(fn(x, k, strides=(s, s)))
  return str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, k)).count("conv_general_dilated[")


@needs_cpu
@pytest.mark.parametrize("cache", [False, True])
def test_options_follow_jaxlib_version_unless_set(monkeypatch, cache):
  monkeypatch.delenv("QNET_CPU_CONV_OPTIONS", raising=False)
  monkeypatch.setattr(qconv, "_persistent_cache_on", lambda: cache)
  eigen, onednn = qconv.CPU_CONV_OPTIONS, qconv.ONEDNN_OPTIONS
  # jaxlib 0.12 cannot put oneDNN calls in the persistent cache: no set while it is on.
  new = {} if cache else onednn
  for version, want in [((0, 10, 2), eigen), ((0, 11, 0), eigen), ((0, 12, 0, 1), new)]:
    monkeypatch.setattr(qconv.jaxlib_version, "__version_info__", version)
    assert qconv.cpu_compiler_options() == want, version
    for value, forced in [("1", eigen), ("eigen", eigen), (" oneDNN ", onednn), ("0", {})]:
      monkeypatch.setenv("QNET_CPU_CONV_OPTIONS", value)
      assert qconv.cpu_compiler_options() == forced, (version, value)
    monkeypatch.setenv("QNET_CPU_CONV_OPTIONS", "none")
    assert qconv.cpu_compiler_options() == {}
    monkeypatch.delenv("QNET_CPU_CONV_OPTIONS")


def test_persistent_cache_is_seen():
  # conftest turns the cache on for the suite; the rule above reads it from jax.config.
  assert qconv._persistent_cache_on()


@needs_cpu
def test_unknown_option_set_names_the_variable_and_values(monkeypatch):
  monkeypatch.setenv("QNET_CPU_CONV_OPTIONS", "mkl")
  with pytest.raises(ValueError, match=r"QNET_CPU_CONV_OPTIONS='mkl'.*eigen, onednn.*0"):
    qconv.cpu_compiler_options()


@needs_cpu
@pytest.mark.filterwarnings("ignore:Error writing persistent compilation cache entry")
def test_onednn_set_routes_convolutions_to_onednn():
  # A 16-channel 32x32 conv: the shape YNNPACK leaves to oneDNN under XLA's defaults.
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 16))
  k = jax.random.normal(jax.random.key(1), (3, 3, 16, 16)) * 0.1
  w = jax.random.normal(jax.random.key(2), (2, 32, 32, 16))
  loss = lambda x, k: jnp.sum(qconv.conv(x, k) * w)
  grads = {}
  for name, opts in [("onednn", qconv.ONEDNN_OPTIONS), ("none", {})]:
    f = jax.jit(jax.grad(loss, argnums=(0, 1)), compiler_options=opts or None)
    hlo = f.lower(x, k).compile().as_text()
    assert ("__onednn$convolution" in hlo) == (name == "onednn" and ONEDNN_TAKES), name
    grads[name] = f(x, k)
  for got, want in zip(grads["onednn"], grads["none"]):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@needs_cpu
def test_subpixel_follows_env_not_options(monkeypatch):
  for name in ("QNET_CPU_CONV_OPTIONS", "QNET_CPU_CONV_BARRIER", "QNET_CPU_CONV_SUBPIXEL"):
    monkeypatch.delenv(name, raising=False)
  on = {s: _conv_count(qconv.conv, s) for s in (1, 2)}
  monkeypatch.setenv("QNET_CPU_CONV_SUBPIXEL", "0")
  off = {s: _conv_count(qconv.conv, s) for s in (1, 2)}
  # Stride 2: the input gradient's one dilated conv becomes four stride-1 phase convs.
  assert on[2] == off[2] + 3
  assert on[1] == off[1]  # stride 1: stock gradients either way
  monkeypatch.setenv("QNET_CPU_CONV_SUBPIXEL", "1")
  for options in ("0", "eigen", "onednn"):  # measured a win (or no loss) under each
    monkeypatch.setenv("QNET_CPU_CONV_OPTIONS", options)
    assert _conv_count(qconv.conv) == on[2]


@needs_cpu
def test_env_overrides_select_plain_path(monkeypatch):
  monkeypatch.setenv("QNET_CPU_CONV_OPTIONS", "0")
  monkeypatch.setenv("QNET_CPU_CONV_BARRIER", "0")
  monkeypatch.setenv("QNET_CPU_CONV_SUBPIXEL", "0")
  assert qconv.cpu_compiler_options() == {}
  x, k, _ = data(3)
  loss = lambda x, k: jnp.sum(qconv.conv(x, k))
  assert " cond[" not in str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, k))
  hlo = train_like_hlo(qconv.conv, qconv.cpu_compiler_options())
  _summary("qnet conv, overrides off", hlo)
  assert "conditional(" not in hlo

  monkeypatch.setenv("QNET_CPU_CONV_BARRIER", "1")
  assert " cond[" in str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, k))


def test_non_cpu_backend_is_plain(monkeypatch):
  monkeypatch.setattr(qconv, "_on_cpu", lambda: False)
  assert qconv.cpu_compiler_options() == {}
  x, k, _ = data(3)
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda x, k: jnp.sum(qconv.conv(x, k))))(x, k))
  assert " cond[" not in jaxpr



@needs_cpu
@pytest.mark.filterwarnings("ignore:Error writing persistent compilation cache entry")
@pytest.mark.heavy
def test_sharded_train_step_under_each_option_set(monkeypatch):
  """qnet's own 4-device train step compiles under each set and computes the same step."""
  import functools

  from configs import fashion_mnist_w4a4
  from qnet.train import build, joint

  c = fashion_mnist_w4a4.get_config()
  c.model = "tiny_cnn"  # oneDNN takes some of its convolutions (none of fmnist_cnn's)
  students, teacher = build.build_specs(c, total_steps=100)
  shape = build.input_shape(c)
  images = jax.random.uniform(jax.random.key(0), (8, *shape))
  batch = {"image": images, "label": jnp.arange(8, dtype=jnp.int32) % 10}
  init = functools.partial(joint.init_state, students, teacher, c.seed)
  losses = {}
  for name in ("0", "eigen", "onednn"):
    monkeypatch.setenv("QNET_CPU_CONV_OPTIONS", name)
    p_train, _ = build.compile_steps(build.create_mesh(), students, teacher, None)
    state = init(images[:1])
    hlo = p_train.lower(state, batch).compile().as_text()
    assert ("__onednn$convolution" in hlo) == (name == "onednn" and ONEDNN_TAKES), name
    _, metrics = p_train(state, batch)
    losses[name] = float(metrics["train_loss"])
  print(losses)
  assert all(np.isfinite(v) for v in losses.values())
  np.testing.assert_allclose(losses["onednn"], losses["0"], rtol=1e-3)
  np.testing.assert_allclose(losses["eigen"], losses["0"], rtol=1e-3)
