"""DoReFa-style quantizers with straight-through gradients (qnet/METHOD.md, "Quantizers").

All functions are pure and take `bits` as data: a Python number or a (traced) scalar array.
Changing its value never recompiles a jitted caller. `bits >= 32` means full precision:
weights pass through untouched, activations are only clipped to [0, 1].

Edge cases (documented behaviour, tested):
  * an all-zero kernel quantizes without NaN (the max in the normalisation is floored at
    `_TINY`); DoReFa weight levels have no zero, so zeros map to the level nearest 0, +1/n;
  * +-Inf weights saturate (tanh(+-inf) = +-1); +-Inf activations clip to 1 or 0;
  * NaN inputs propagate NaN (never silently replaced), so the trainer's NaN check sees them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FULL_PRECISION = 32
# Floor of max|tanh(w)|: keeps an all-zero kernel finite (0 / _TINY = 0) and is far below
# any real weight's tanh, so it never changes a non-zero kernel's result.
_TINY = 1e-12


def _as_bits(bits) -> jax.Array:
  return jnp.asarray(bits, dtype=jnp.float32)


def num_levels(bits) -> jax.Array:
  """`n = 2**bits - 1`, the number of quantization steps above zero."""
  return jnp.exp2(_as_bits(bits)) - 1.0


def is_full_precision(bits) -> jax.Array:
  """Boolean (traced) scalar: does `bits` mean full precision?"""
  return _as_bits(bits) >= FULL_PRECISION


@jax.custom_vjp
def _round_ste(x: jax.Array) -> jax.Array:
  return jnp.round(x)


def _round_ste_fwd(x):
  return jnp.round(x), None


def _round_ste_bwd(_, g):
  return (g,)


_round_ste.defvjp(_round_ste_fwd, _round_ste_bwd)


def uniform_quantize(x: jax.Array, bits) -> jax.Array:
  """`q_k(x) = round(n x) / n` on [0, 1] with `n = 2**bits - 1`; gradient 1 (STE).

  Does not clip: callers bring `x` into [0, 1]. For `bits >= 32` it returns `x`.
  """
  n = num_levels(bits).astype(x.dtype)
  q = _round_ste(x * n) / n
  return jnp.where(is_full_precision(bits), x, q)


def quantize_weights(w: jax.Array, bits, per_channel: bool = False) -> jax.Array:
  """k-bit weights in [-1, 1]: `2 q_k(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1`.

  The max is over the whole kernel (per-tensor), or over all but the last (output-channel)
  axis with `per_channel=True`. Gradients flow through tanh and the normalisation; only
  `round` is straight-through. `bits >= 32` returns `w` untouched (no tanh).
  """
  t = jnp.tanh(w)
  axes = tuple(range(w.ndim - 1)) if per_channel else None
  m = jnp.max(jnp.abs(t), axis=axes, keepdims=per_channel)
  w01 = t / (2.0 * jnp.maximum(m, _TINY)) + 0.5
  wq = 2.0 * uniform_quantize(w01, bits) - 1.0
  return jnp.where(is_full_precision(bits), w, wq)


def quantize_activations(x: jax.Array, bits) -> jax.Array:
  """k-bit activations: `q_k(clip(x, 0, 1))`; gradient 1 on [0, 1], 0 outside.

  `bits >= 32` is the clip-ReLU `clip(x, 0, 1)` (the full-precision teacher's activation).
  """
  return _quantize_activations_ste(x, _as_bits(bits))


@jax.custom_vjp
def _quantize_activations_ste(x, bits):
  return _quantize_activations(x, bits)


def _quantize_activations(x, bits):
  c = jnp.clip(x, 0.0, 1.0)
  n = num_levels(bits).astype(x.dtype)
  return jnp.where(is_full_precision(bits), c, jnp.round(c * n) / n)


def _quantize_activations_fwd(x, bits):
  return _quantize_activations(x, bits), (x, bits)


def _quantize_activations_bwd(res, g):
  x, bits = res
  # The pass-through mask is written out (not left to autodiff of clip) so the boundary
  # points 0 and 1 get gradient 1, not the 0.5 that max/min ties would give.
  mask = (x >= 0.0) & (x <= 1.0)
  return jnp.where(mask, g, jnp.zeros_like(g)), jnp.zeros_like(bits)


_quantize_activations_ste.defvjp(_quantize_activations_fwd, _quantize_activations_bwd)
