"""k-bit packing: unsigned integer codes <-> a dense little-endian bitstream of bytes.

Code `t` of a flat array occupies bits `[t*k, (t+1)*k)` of the stream, least significant
bit first, and bit `b` of the stream is bit `b % 8` of byte `b // 8`. So 2-bit codes are 4
per byte, 4-bit codes 2 per byte, 8-bit codes one per byte, and 3-bit codes straddle byte
boundaries (8 codes in 3 bytes); the last byte is zero-padded. `ceil(size * k / 8)` bytes.
"""

from __future__ import annotations

import math

import numpy as np

MAX_BITS = 8


def _check_bits(bits: int) -> int:
  if not (isinstance(bits, (int, np.integer)) and 1 <= bits <= MAX_BITS):
    raise ValueError(f"bits={bits!r}; allowed: an integer 1..{MAX_BITS}")
  return int(bits)


def packed_size(size: int, bits: int) -> int:
  """Bytes that `size` codes of `bits` bits take."""
  return math.ceil(size * _check_bits(bits) / 8)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
  """uint8 bitstream of the flattened (C order) `codes`, each in `[0, 2**bits)`."""
  bits = _check_bits(bits)
  flat = np.asarray(codes).reshape(-1)
  if flat.size and (flat.min() < 0 or flat.max() >= 1 << bits):
    raise ValueError(f"codes out of range for {bits} bits: [{flat.min()}, {flat.max()}]")
  planes = (flat.astype(np.uint8)[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
  return np.packbits(planes.reshape(-1), bitorder="little")


def unpack(stream: np.ndarray, bits: int, shape: tuple[int, ...]) -> np.ndarray:
  """Inverse of `pack`: uint8 codes of `shape` from the bitstream."""
  bits = _check_bits(bits)
  size = math.prod(shape)
  stream = np.asarray(stream, np.uint8).reshape(-1)
  if stream.size != packed_size(size, bits):
    raise ValueError(
      f"stream has {stream.size} bytes; {size} codes of {bits} bits need {packed_size(size, bits)}"
    )
  planes = np.unpackbits(stream, count=size * bits, bitorder="little").reshape(size, bits)
  weights = (1 << np.arange(bits)).astype(np.uint16)
  return (planes.astype(np.uint16) @ weights).astype(np.uint8).reshape(shape)
