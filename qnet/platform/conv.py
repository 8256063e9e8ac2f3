"""2-D convolution (NHWC / HWIO) that trains fast on XLA's CPU backend.

On GPU/TPU `conv` is plain `lax.conv_general_dilated`. On CPU three fixes are on
by default, each measured on a 2-vCPU AVX2 host (ResNet-20, batch 128); the
measurements and commands are in experiments/README.md ("CPU conv tuning").

1. Compiler options (`cpu_compiler_options()`, which `qnet.train.build.compile_steps`
   passes to its jits), one of two sets chosen by jaxlib version:
   - jaxlib < 0.12, the Eigen set: XLA 0.10 routes kernel-gradient convolutions (and
     wide forward/input-gradient ones) to YNNPACK; the set sends convolutions to
     XLA's Eigen path and keeps YNNPACK for dots and reductions (YNNPACK off
     entirely is worse: reductions slow down). Idle machine, ResNet-20 step,
     alternating rounds: jaxlib 0.10.2 523 -> 402 ms (faster in 3/3 rounds).
     Adding oneDNN on 0.10.2: 432 -> 416 ms (4/6 rounds), earlier 467 vs 464 ms (3/6):
     within the spread, not taken.
   - jaxlib >= 0.12, the oneDNN set: YNNPACK's convolutions are no longer slow
     there (the Eigen set: 400 ms vs 397 ms without it), and XLA's oneDNN custom
     call takes the convolutions YNNPACK leaves (the 16-channel 32x32 ones; per op
     3.4 ms vs 6.0 ms forward and input gradient). Step: 476 -> 406 ms, CPU time
     902 -> 752 ms, faster in 5/6 alternating rounds (an earlier run: 457 -> 421 ms,
     6/6). oneDNN for every convolution (with the Eigen set) is slower: its kernel
     gradients are. While JAX's persistent compilation cache is on, no set is used
     (jaxlib 0.12 cannot cache oneDNN calls).
   0.11 was not measured and keeps the Eigen set.
2. Cond barrier: XLA fuses a whole stage's BatchNorm -> ReLU -> residual chain
   into the layout transposes in front of each kernel-gradient conv and
   recomputes it there (~100+ ms per op instead of ~1 ms). `lax.optimization_barrier`
   does not stop this on CPU; an identity `lax.cond` on a runtime predicate does.
   `conv` is therefore a `jax.custom_vjp` whose backward materialises the saved
   input and the cotangent through such a cond. Still needed on jaxlib 0.12.0.1:
   the compiled HLO shows the re-fused transposes without it; with it the step
   took 7-10% less CPU time (both stacks, with the Eigen set) and was faster than
   the stock conv in 5 of 5 alternating rounds (without options).
3. Sub-pixel strided input gradients (`subpixel_input_grad`): the stock vjp of a
   stride-2 conv convolves a zero-dilated cotangent; one stride-1 conv per output
   phase does the forward's multiply-adds instead. Per op, with the Eigen set:
   ResNet-20's 3x3 stride-2 input gradients took a third and a sixth less CPU time
   (12.6 -> 8.4 ms, 6.0 -> 5.0 ms, jaxlib 0.12; alike on 0.10.2). Idle machine, step
   level: jaxlib 0.12.0.1 without options 419 -> 397 ms (3/3 rounds); 0.10.2 with
   the Eigen set 411 -> 402 ms (2/3 rounds), without it 522 vs 524 ms (no difference).

Forward outputs and kernel gradients are bitwise identical to the stock conv under
the same compiler options; strided input gradients equal the stock ones up to fp32
summation order (~1e-6). The option sets change which library sums, so fp32
results move at the ~1e-4 level between sets.

Environment overrides (read when a function is traced / a jit is built):
  QNET_CPU_CONV_OPTIONS=eigen|onednn|0  the option set, whatever the jaxlib, or
                            none (XLA's defaults); 1 means eigen (unset:
                            `default_option_set()`).
  QNET_CPU_CONV_BARRIER=0   no cond barrier.
  QNET_CPU_CONV_SUBPIXEL=0  stock strided input gradients.
With all three off, `conv` is plain `lax.conv_general_dilated`.
Re-check after jaxlib upgrades: `experiments/conv_speed.py` (and `--per_op`),
tests/test_conv.py (the HLO checks).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jaxlib import version as jaxlib_version

Padding = str | Sequence[tuple[int, int]]
_DIMS = ("NHWC", "HWIO", "NHWC")
# The Eigen set: keep YNNPACK for dots and reductions, drop it for convolutions. Equivalent
# to XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution; the "-..."
# form is rejected as a per-jit option, so the kept types are listed.
CPU_CONV_OPTIONS = {
  "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
}
# The oneDNN set: XLA's default library choices, plus oneDNN for the convolutions that
# YNNPACK does not claim (on ResNet-20: the 16-channel 32x32 forward and input-gradient
# convolutions, where oneDNN is ~1.8x faster; kernel gradients stay on YNNPACK).
ONEDNN_OPTIONS = {
  "xla_cpu_use_onednn": True,
  "xla_cpu_experimental_onednn_custom_call": True,
}
OPTION_SETS = {"eigen": CPU_CONV_OPTIONS, "onednn": ONEDNN_OPTIONS}
# The first jaxlib (major, minor) that gets the oneDNN set instead of the Eigen set.
_ONEDNN_FROM = (0, 12)
_ON = ("1", "true", "yes", "on")  # QNET_CPU_CONV_OPTIONS's earlier on/off switch: 1 = eigen
_OFF = ("0", "false", "no", "off", "none")


def _env_on(name: str) -> bool:
  return os.environ.get(name, "1").strip().lower() not in _OFF


def _on_cpu() -> bool:
  return jax.default_backend() == "cpu"


def _persistent_cache_on() -> bool:
  return bool(jax.config.jax_compilation_cache_dir)


def default_option_set() -> str:
  """The option set used when QNET_CPU_CONV_OPTIONS is unset (measured, module docstring).

  `eigen` on jaxlib < 0.12; from 0.12 `onednn`, or `none` (XLA's defaults) while JAX's
  persistent compilation cache is on: jaxlib 0.12 cannot cache executables that call
  oneDNN (each compile warns `std::bad_alloc` and is redone next run).
  """
  if tuple(jaxlib_version.__version_info__[:2]) < _ONEDNN_FROM:
    return "eigen"
  return "none" if _persistent_cache_on() else "onednn"


def cpu_compiler_options() -> dict[str, str | bool]:
  """Per-jit compiler options for CPU convolutions: one of `OPTION_SETS`, or none.

  Empty on non-CPU backends. QNET_CPU_CONV_OPTIONS picks the set: `eigen` (or 1),
  `onednn`, or 0 / none for XLA's defaults; unset, `default_option_set()`.
  """
  if not _on_cpu():
    return {}
  raw = os.environ.get("QNET_CPU_CONV_OPTIONS", "").strip()
  name = raw.lower() or default_option_set()
  if name in _OFF:
    return {}
  name = "eigen" if name in _ON else name
  if name not in OPTION_SETS:
    raise ValueError(
      f"QNET_CPU_CONV_OPTIONS={raw!r}: allowed values are {', '.join(OPTION_SETS)}, 1 (= eigen) "
      "and 0 or none (XLA's defaults)"
    )
  return dict(OPTION_SETS[name])


def _stock(x, kernel, strides, padding, precision):
  return lax.conv_general_dilated(
    x, kernel, window_strides=strides, padding=padding, dimension_numbers=_DIMS, precision=precision
  )


def _materialise(x: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Identity that XLA cannot see through, so x and g are computed once."""
  a = x.reshape(-1)[0]
  pred = (a == a) | (a != a)  # always true (NaN included); XLA can't prove it
  # The branches must differ, or XLA folds the cond away.
  return lax.cond(pred, lambda t: t, lambda t: (-t[0], -t[1]), (x, g))


def _pads(in_hw: Sequence[int], kernel_hw: Sequence[int], strides, padding) -> list:
  if isinstance(padding, str):
    return list(lax.padtype_to_pads(tuple(in_hw), tuple(kernel_hw), strides, padding))
  return [tuple(p) for p in padding]


def subpixel_applies(kernel_hw: Sequence[int], strides: Sequence[int], padding) -> bool:
  """Whether `subpixel_input_grad` is used: a strided conv with kernel >= stride, pads >= 0."""
  if isinstance(padding, str):
    pads_ok = True
  else:
    pads_ok = all(lo >= 0 and hi >= 0 for lo, hi in padding)
  return pads_ok and any(s > 1 for s in strides) and all(
    k >= s for k, s in zip(kernel_hw, strides)
  )


def subpixel_input_grad(
  g: jax.Array,
  kernel: jax.Array,
  in_hw: Sequence[int],
  strides: Sequence[int],
  padding: Padding,
  precision: Any = None,
) -> jax.Array:
  """Input gradient of a strided conv as stride-1 convs, one per output phase, interleaved.

  The stock vjp convolves the cotangent dilated by the stride (zeros between its
  pixels). Instead, input pixels are grouped by phase r = (position + pad_lo) mod
  stride: phase r is a stride-1 correlation of g with the kernel taps r, r + s, ...
  (flipped), so the s_h * s_w phase convs together do the forward's multiply-adds;
  they are interleaved back by stack/reshape. Needs `subpixel_applies`. Equal to the
  stock input gradient up to fp32 summation order.
  """
  sh, sw = strides
  kh, kw, cin, _ = kernel.shape
  h, w = in_hw
  (lo_h, _), (lo_w, _) = _pads(in_hw, (kh, kw), strides, padding)
  ho, wo = g.shape[1:3]
  # Phase outputs cover input rows -lo_h ... rounded up to whole strides.
  qh, qw = -(-(lo_h + h) // sh), -(-(lo_w + w) // sw)
  rows = []
  for rh in range(sh):
    cols = []
    for rw in range(sw):
      sub = jnp.swapaxes(kernel[rh::sh, rw::sw][::-1, ::-1], 2, 3)  # HW, Cout -> Cin
      th, tw = sub.shape[:2]
      pads = ((th - 1, qh - ho), (tw - 1, qw - wo))
      cols.append(_stock(g, sub, (1, 1), pads, precision))
    rows.append(jnp.stack(cols, axis=3))  # N, qh, qw, sw, Cin
  z = jnp.stack(rows, axis=2).reshape(g.shape[0], qh * sh, qw * sw, cin)
  return z[:, lo_h : lo_h + h, lo_w : lo_w + w]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _cpu_conv(x, kernel, strides, padding, precision, barrier, subpixel):
  return _stock(x, kernel, strides, padding, precision)


def _cpu_conv_fwd(x, kernel, strides, padding, precision, barrier, subpixel):
  return _stock(x, kernel, strides, padding, precision), (x, kernel)


def _cpu_conv_bwd(strides, padding, precision, barrier, subpixel, res, g):
  x, kernel = res
  if barrier:
    x, g = _materialise(x, g)
  if not (subpixel and subpixel_applies(kernel.shape[:2], strides, padding)):
    _, vjp = jax.vjp(lambda a, b: _stock(a, b, strides, padding, precision), x, kernel)
    return vjp(g)
  _, vjp_k = jax.vjp(lambda b: _stock(x, b, strides, padding, precision), kernel)
  dx = subpixel_input_grad(g, kernel, x.shape[1:3], strides, padding, precision)
  return dx.astype(x.dtype), vjp_k(g)[0]


_cpu_conv.defvjp(_cpu_conv_fwd, _cpu_conv_bwd)


def custom_conv(
  x: jax.Array,
  kernel: jax.Array,
  *,
  strides: Sequence[int] = (1, 1),
  padding: Padding = "SAME",
  precision: Any = None,
  barrier: bool = True,
  subpixel: bool = False,
) -> jax.Array:
  """The custom-VJP conv on any backend, each backward fix chosen explicitly.

  barrier: materialise the saved input and cotangent behind an identity cond.
  subpixel: strided input gradients by `subpixel_input_grad`.
  """
  strides = tuple(int(s) for s in strides)
  if not isinstance(padding, str):  # nondiff args must be hashable
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  return _cpu_conv(x, kernel, strides, padding, precision, bool(barrier), bool(subpixel))


def conv(
  x: jax.Array,
  kernel: jax.Array,
  *,
  strides: Sequence[int] = (1, 1),
  padding: Padding = "SAME",
  precision: Any = None,
) -> jax.Array:
  """NHWC x HWIO -> NHWC convolution, equal to `lax.conv_general_dilated`.

  On CPU it is `custom_conv` with the fixes of the module docstring that the
  environment leaves on; reverse mode only (no jvp).
  """
  if _on_cpu():
    barrier = _env_on("QNET_CPU_CONV_BARRIER")
    subpixel = _env_on("QNET_CPU_CONV_SUBPIXEL")
    if barrier or subpixel:
      return custom_conv(
        x,
        kernel,
        strides=strides,
        padding=padding,
        precision=precision,
        barrier=barrier,
        subpixel=subpixel,
      )
  return _stock(x, kernel, tuple(strides), padding, precision)
