"""2-D convolution (NHWC / HWIO) that trains fast on XLA's CPU backend.

On GPU/TPU `conv` is plain `lax.conv_general_dilated`. On CPU two measured
problems make the backward pass slow (jaxlib 0.10.2, 2-vCPU AVX2 host,
ResNet-20 batch 128: ~1.1-1.5 s/step by default vs ~0.45-0.53 s with both fixes):

1. XLA routes kernel-gradient convolutions (and wide forward/input-gradient
   ones) to YNNPACK, 5-10x slower than its Eigen path for these shapes.
   Fix: the per-jit compiler options from `cpu_compiler_options()`, which
   `qnet.build.compile_steps` passes to its jits (turning YNNPACK off entirely is
   worse: reductions slow down).
2. XLA fuses a whole stage's BatchNorm -> ReLU -> residual chain into the
   layout transposes in front of each kernel-gradient conv and recomputes it
   there (~100+ ms per op instead of ~1 ms). `lax.optimization_barrier` does
   not stop this on CPU; an identity `lax.cond` on a runtime predicate does.
   `conv` is therefore a `jax.custom_vjp` whose backward materialises the saved
   input and the cotangent through such a cond, then runs the stock conv vjp.

Results are bitwise identical to the stock conv under the same compiler
options. The options themselves change which library sums, so fp32 results
move at the ~1e-4 level compared with XLA's default CPU options.

Environment overrides (read when a function is traced / a jit is built):
  QNET_CPU_CONV_OPTIONS=0  `cpu_compiler_options()` returns {} (XLA defaults).
  QNET_CPU_CONV_BARRIER=0  `conv` is plain `lax.conv_general_dilated` on CPU too.
Re-check both fixes after jaxlib upgrades (see tests/test_conv.py).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
from jax import lax

Padding = str | Sequence[tuple[int, int]]
_DIMS = ("NHWC", "HWIO", "NHWC")
# Keep YNNPACK for dots and reductions, drop it for convolutions. Equivalent to
# XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution; the
# "-..." form is rejected as a per-jit option, so the kept types are listed.
_CPU_OPTIONS = {
  "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
}


def _env_on(name: str) -> bool:
  return os.environ.get(name, "1").strip().lower() not in ("0", "false", "no", "off")


def _on_cpu() -> bool:
  return jax.default_backend() == "cpu"


def cpu_compiler_options() -> dict[str, str]:
  """Per-jit compiler options that keep CPU convolutions off YNNPACK.

  Empty on non-CPU backends or when QNET_CPU_CONV_OPTIONS=0.
  """
  if not _on_cpu() or not _env_on("QNET_CPU_CONV_OPTIONS"):
    return {}
  return dict(_CPU_OPTIONS)


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _cpu_conv(x, kernel, strides, padding, precision):
  return _stock(x, kernel, strides, padding, precision)


def _cpu_conv_fwd(x, kernel, strides, padding, precision):
  return _stock(x, kernel, strides, padding, precision), (x, kernel)


def _cpu_conv_bwd(strides, padding, precision, res, g):
  x, kernel = res
  x, g = _materialise(x, g)
  _, vjp = jax.vjp(lambda a, b: _stock(a, b, strides, padding, precision), x, kernel)
  return vjp(g)


_cpu_conv.defvjp(_cpu_conv_fwd, _cpu_conv_bwd)


def conv(
  x: jax.Array,
  kernel: jax.Array,
  *,
  strides: Sequence[int] = (1, 1),
  padding: Padding = "SAME",
  precision: Any = None,
) -> jax.Array:
  """NHWC x HWIO -> NHWC convolution, equal to `lax.conv_general_dilated`.

  On CPU (unless QNET_CPU_CONV_BARRIER=0) it is a custom_vjp with the cond
  barrier described in the module docstring; reverse mode only (no jvp).
  """
  strides = tuple(int(s) for s in strides)
  if not isinstance(padding, str):  # nondiff args must be hashable
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  if _on_cpu() and _env_on("QNET_CPU_CONV_BARRIER"):
    return _cpu_conv(x, kernel, strides, padding, precision)
  return _stock(x, kernel, strides, padding, precision)
