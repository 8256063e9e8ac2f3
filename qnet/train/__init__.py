"""Training: the joint state and pure steps (`joint`), compiled steps (`build`), the loop,
calibration, checkpoints, run config and validation, metrics and console, fault handling.
May import `quant`, `models`, `data` and `platform`; never `deploy`.
"""
