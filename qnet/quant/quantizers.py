"""Quantizers: DoReFa's fixed ranges, and LSQ and PACT's learned ones (docs/results.md, "Learned
quantizers (LSQ, PACT)"), all with straight-through rounding. DoReFa's formulas: qnet/METHOD.md,
"Quantizers".

All functions are pure and take `bits` as data: a Python number or a (traced) scalar array.
Changing its value never recompiles a jitted caller. `bits >= 32` means full precision:
weights pass through untouched; DoReFa's activations are only clipped to [0, 1], LSQ's and
PACT's are a plain ReLU.

Edge cases of the DoReFa quantizers (documented behaviour, tested):
  * an all-zero kernel quantizes without NaN (the max in the normalisation is floored at
    `_TINY`); DoReFa weight levels have no zero, so zeros map to the level nearest 0, +1/n;
  * +-Inf weights saturate (tanh(+-inf) = +-1); +-Inf activations clip to 1 or 0;
  * NaN inputs propagate NaN (never silently replaced), so the trainer's NaN check sees them.
"""

from __future__ import annotations

import functools

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


# ----------------------------------------------------------------------------- learned ranges
#
# LSQ (Esser et al., ICLR 2020) learns a step `s` per layer (or per output channel):
# `v_q = s * round(clip(v / s, -Q_n, Q_p))`. qnet stores a bits-independent parameter
# `t = s * sqrt(Q_p(bits))` instead (in the `weight_clip` / `act_clip` slot that PACT uses for
# its clipping level alpha), so that when a layer's bits change (a progressive phase
# boundary) the step follows LSQ's own initialisation rule, `s = t / sqrt(Q_p)`: LSQ
# initialises `s = 2 mean|v| / sqrt(Q_p)`, i.e. `t = 2 mean|v|` at every bit-width. (Keeping the
# clip level `Q_p s` instead multiplies the step by `Q_p(old) / Q_p(new)` at a boundary, 127x
# from 8 to 2 bits: measured, a progressive 32 -> 8 -> 4 -> 2 run then rounded almost every
# weight to zero and fell to chance accuracy.) The gradient reaching `t` is scaled so that an
# SGD step on `t` moves `s` exactly as LSQ's step on `s` would: `dL/dt := sqrt(Q_p) g dL/ds`
# with LSQ's `g = 1 / sqrt(N Q_p)`, i.e. `dL/dt = dL/ds / sqrt(N)`.
#
# Full precision (`bits >= 32`) means no quantizer: raw weights and a plain ReLU, and `t`
# gets no gradient (it is not used).


def lsq_levels(bits, signed: bool) -> tuple[jax.Array, jax.Array]:
  """`(Q_n, Q_p)`: LSQ's integer range, `[-2^(b-1), 2^(b-1) - 1]` signed, `[0, 2^b - 1]` not."""
  b = _as_bits(bits)
  if signed:
    return jnp.exp2(b - 1.0), jnp.exp2(b - 1.0) - 1.0
  return jnp.float32(0.0), num_levels(b)


def lsq_step(clip: jax.Array, bits, signed: bool) -> jax.Array:
  """LSQ's step `s = t / sqrt(Q_p(bits))` from its stored parameter `t` (float32)."""
  _, qp = lsq_levels(bits, signed)
  return jnp.asarray(clip, jnp.float32) / jnp.sqrt(qp)


def lsq_init_clip(v: jax.Array, signed: bool, axes=None) -> jax.Array:
  """LSQ's initial step `2 mean|v| / sqrt(Q_p)` as qnet's parameter `t = s sqrt(Q_p)`:
  `2 mean|v|`, the same at every bit-width.

  For activations `v` is the quantizer's input after the ReLU that LSQ's networks put before
  it (qnet's quantizer is the ReLU), so `mean(max(v, 0))`.
  """
  a = jnp.abs(v) if signed else jnp.maximum(v, 0.0)
  return 2.0 * jnp.mean(a.astype(jnp.float32), axis=axes)


def pact_init_alpha(v: jax.Array, bits) -> jax.Array:
  """PACT's initial alpha in qnet: the clip level `Q_p s` of LSQ's initial step at `bits`,
  `2 mean(max(v, 0)) sqrt(2^bits - 1)` (PACT's paper starts at 10, far too wide for qnet's
  BN-normalised inputs)."""
  _, qp = lsq_levels(bits, signed=False)
  return lsq_init_clip(v, signed=False) * jnp.sqrt(qp)


def lsq_quantize(v: jax.Array, clip: jax.Array, bits, signed: bool) -> jax.Array:
  """LSQ fake-quantization of `v` with parameter `clip` = `t` (a scalar, or one per last axis).

  Forward: `s * round(clip(v / s, -Q_n, Q_p))` with `s = lsq_step(t, bits)`. Backward (LSQ
  eqs. 3-5): `v` gets the gradient where `-Q_n < v/s < Q_p`; `t` gets `sqrt(Q_p) g
  sum(dL/dv_q * ds)` with `ds = round(v/s) - v/s` inside, `-Q_n` / `Q_p` below / above, `g =
  1/sqrt(N Q_p)`, `N` the number of elements sharing the step (per example for activations).
  `bits >= 32`: `v` (weights) or `relu(v)` (activations), no gradient to `t`.
  """
  return _lsq(v, clip, _as_bits(bits), signed)


def _lsq_parts(v, clip, bits, signed):
  qn, qp = lsq_levels(bits, signed)
  s = lsq_step(clip, bits, signed).astype(v.dtype)
  u = v / s
  inside = (u > -qn) & (u < qp)
  q = jnp.round(jnp.clip(u, -qn, qp))
  fp = is_full_precision(bits)
  out = jnp.where(fp, v if signed else jnp.maximum(v, 0.0), q * s)
  return out, (u, q, inside, qn, qp, fp)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _lsq(v, clip, bits, signed):
  return _lsq_parts(v, clip, bits, signed)[0]


def _lsq_fwd(v, clip, bits, signed):
  out, res = _lsq_parts(v, clip, bits, signed)
  return out, (v, clip, bits, res)


def _lsq_bwd(signed, saved, g):
  v, clip, bits, (u, q, inside, qn, qp, fp) = saved
  fp_grad = g if signed else jnp.where(v > 0, g, jnp.zeros_like(g))
  dv = jnp.where(fp, fp_grad, jnp.where(inside, g, jnp.zeros_like(g)))
  ds = jnp.where(inside, q - u, jnp.where(u <= -qn, -qn, qp)).astype(jnp.float32)
  per_step = g.astype(jnp.float32) * ds
  # N: the weights sharing a step; for activations, the features of one example (LSQ's N_F).
  n = v.size / clip.size if signed else v.size / v.shape[0]
  dclip = jnp.sum(per_step.reshape(-1, clip.size), axis=0).reshape(clip.shape)
  dclip = jnp.where(fp, 0.0, dclip / jnp.sqrt(n)).astype(clip.dtype)
  return dv, dclip, jnp.zeros_like(bits)


_lsq.defvjp(_lsq_fwd, _lsq_bwd)


def pact_quantize(x: jax.Array, alpha: jax.Array, bits) -> jax.Array:
  """PACT (Choi et al. 2018): `round(clip(x, 0, alpha) n / alpha) alpha / n`, `n = 2^b - 1`.

  Straight-through round; `x` gets the gradient on `[0, alpha)`, `alpha` the summed gradient
  where `x >= alpha` (PACT eq. 2). PACT's L2 penalty on alpha is weight decay on it (see
  `qnet.train.joint.create_optimizer`). `bits >= 32`: `relu(x)`, no gradient to `alpha`.
  """
  return _pact(x, alpha, _as_bits(bits))


def _pact_fwd(x, alpha, bits):
  n = num_levels(bits).astype(x.dtype)
  a = alpha.astype(x.dtype)
  q = jnp.round(jnp.clip(x, 0.0, a) * n / a) * a / n
  return jnp.where(is_full_precision(bits), jnp.maximum(x, 0.0), q), (x, alpha, bits)


@jax.custom_vjp
def _pact(x, alpha, bits):
  return _pact_fwd(x, alpha, bits)[0]


def _pact_bwd(saved, g):
  x, alpha, bits = saved
  fp = is_full_precision(bits)
  a = alpha.astype(x.dtype)
  zero = jnp.zeros_like(g)
  dx = jnp.where(fp, jnp.where(x > 0, g, zero), jnp.where((x >= 0) & (x < a), g, zero))
  dalpha = jnp.sum(jnp.where(x >= a, g, zero).astype(jnp.float32))
  return dx, jnp.where(fp, 0.0, dalpha).astype(alpha.dtype), jnp.zeros_like(bits)


_pact.defvjp(_pact_fwd, _pact_bwd)
