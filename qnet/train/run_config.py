"""`WORKDIR/config.json`: the config a run trained with, for tools that read a run later.

`qnet.train.loop` writes it (chief process, on every start, atomically) with the total number of
training steps, which tools need to place a checkpoint's step in the precision schedule
without reading the data set. `qnet.export` and `qnet.evaluate` read it back.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

FILENAME = "config.json"


def _plain(value: Any) -> Any:
  """JSON-safe copy: ConfigDicts become dicts, tuples lists."""
  if isinstance(value, (ml_collections.ConfigDict, dict)):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


def _tuples(value: Any) -> Any:
  """Inverse of `_plain` for sequences: configs hold tuples (JSON gives lists)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def save(workdir: str, config: ml_collections.ConfigDict, total_steps: int) -> str:
  """Writes `WORKDIR/config.json` (temporary file, then rename); returns its path."""
  path = os.path.join(workdir, FILENAME)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump({"config": _plain(config), "total_steps": int(total_steps)}, f, indent=1)
  os.replace(tmp, path)
  return path


def load(workdir: str) -> tuple[ml_collections.ConfigDict, int]:
  """(config, total training steps) of the run in `workdir`.

  Raises FileNotFoundError naming the file when the run did not write one.
  """
  path = os.path.join(workdir, FILENAME)
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"{path} does not exist: not a qnet workdir, or a run started before qnet saved its config"
    )
  with open(path) as f:
    saved = json.load(f)
  return _on_defaults(_tuples(saved["config"])), int(saved["total_steps"])


def _on_defaults(saved: dict) -> ml_collections.ConfigDict:
  """The saved values over `configs/default.py`: a field added to qnet after the run was
  saved takes its default; a field qnet no longer has is dropped."""
  from configs import default
  from qnet.train.config_validation import flatten

  config = default.get_config()
  known = flatten(config)
  config.update_from_flattened_dict({k: v for k, v in flatten(saved).items() if k in known})
  return config
