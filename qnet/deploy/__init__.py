"""Deployment: the integer program (`integer`), bit packing, the ONNX graph, export and
evaluation of exports. May import `quant`, `models`, `data`, `platform` and `train` (to
read a run's checkpoint and config); nothing imports it but the entry points.
"""
