"""The method: quantizers with straight-through gradients, the precision pytree, schedules.

`quantizers` (DoReFa, LSQ, PACT), `precision` (the bit-width tree and its layout),
`schedule` (two-stage, progressive, stochastic). Imports nothing from qnet above it.
"""
