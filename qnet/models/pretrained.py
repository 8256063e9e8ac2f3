"""torchvision and timm ResNet state_dicts into qnet's `tv_resnet18/34/50` (`init_from=
torchvision:PATH` or `timm:PATH`).

A file is read without torch when it is `.safetensors`; a `.pth` goes through
`torch.load(weights_only=True)` (torch is an optional extra, `pip install 'qnet[pth]'`). The
mapping is an explicit table (`key_table`), one row per tensor of the state_dict, built from
the architecture: every key is used exactly once, every qnet leaf is filled, every shape is
checked before any array is read, and the first mismatch is one line naming the key and the
shape qnet expects (`PretrainedError`). Conv kernels go OIHW -> HWIO, the fc weight is
transposed, BatchNorm's weight/bias are `scale`/`bias` and its running mean/var go into
`batch_stats`; `num_batches_tracked` is dropped.

torchvision's and timm's plain ResNet-18/34/50 share one key layout (conv1, bn1,
layer{1..4}.{j}.conv{k}/bn{k}, downsample.0/.1, fc), so both sources use the same table.
Assumed: ResNet v1.5, the stride on the bottleneck's 3x3 (torchvision since 0.3, timm's
`resnet50`). A v1 checkpoint (stride on the first 1x1) has exactly the same keys and shapes, so
no check can tell it apart: it loads and computes a different function. Rejected, by their
keys: other depths, ResNet-C/D deep stems (`conv1.0.weight`), avg-pool shortcuts, non-ResNets.

Imports only numpy at module level (the torch-side test loads this file without jax).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import numpy as np

SOURCES = ("torchvision", "timm")
SUFFIXES = (".safetensors", ".pth", ".pt")
# BatchNorm2d's step counter: PyTorch bookkeeping with no meaning for inference or qnet.
_DROPPED = "num_batches_tracked"


class PretrainedError(ValueError):
  """A pretrained file that cannot start this model (one line: key, expected shape)."""


@dataclasses.dataclass(frozen=True)
class Entry:
  """One state_dict tensor: its key, torch shape, and where it goes in qnet's variables."""

  key: str
  shape: tuple[int, ...]
  collection: str  # "params" | "batch_stats"
  path: tuple[str, ...]
  layout: str  # "conv" (OIHW -> HWIO) | "dense" ([out, in] -> [in, out]) | "vector"


def parse_init_from(value: str) -> tuple[str, str] | None:
  """`('torchvision', PATH)` for `torchvision:PATH` (or `timm:PATH`); None for a workdir."""
  source, sep, path = value.partition(":")
  return (source, path) if sep and source in SOURCES else None


def _archs() -> dict[str, tuple[tuple[int, ...], str]]:
  """{qnet model name: (blocks per stage, block kind)}."""
  # Imported here: tv_resnet needs flax, and the readers below must not (module docstring).
  from qnet.models import tv_resnet  # pylint: disable=import-outside-toplevel

  return {f"tv_{k}": v for k, v in tv_resnet.ARCHS.items()}


def key_table(model: str, in_channels: int, num_classes: int) -> list[Entry]:
  """The state_dict of torchvision's / timm's ResNet matching qnet model `model`, in file order."""
  from qnet.models.tv_resnet import WIDTHS  # pylint: disable=import-outside-toplevel

  archs = _archs()
  if model not in archs:
    raise PretrainedError(
      f"model={model!r} cannot load a torchvision/timm ResNet; use one of {', '.join(archs)}"
    )
  rows: list[Entry] = []

  def conv(key: str, path: tuple[str, ...], o: int, i: int, k: int) -> None:
    rows.append(Entry(f"{key}.weight", (o, i, k, k), "params", (*path, "kernel"), "conv"))

  def bn(key: str, path: tuple[str, ...], c: int) -> None:
    for name, coll, leaf in (
      ("weight", "params", "scale"),
      ("bias", "params", "bias"),
      ("running_mean", "batch_stats", "mean"),
      ("running_var", "batch_stats", "var"),
    ):
      rows.append(Entry(f"{key}.{name}", (c,), coll, (*path, leaf), "vector"))

  stage_sizes, kind = archs[model]
  expansion = 1 if kind == "basic" else 4
  conv("conv1", ("stem",), WIDTHS[0], in_channels, 7)
  bn("bn1", ("stem_bn",), WIDTHS[0])
  c_in = WIDTHS[0]
  for i, (n, width) in enumerate(zip(stage_sizes, WIDTHS), start=1):
    for j in range(n):
      key, block = f"layer{i}.{j}", f"stage{i}_block{j + 1}"
      shapes = (
        [(width, 3), (width, 3)] if kind == "basic" else [(width, 1), (width, 3), (width * 4, 1)]
      )
      c = c_in
      for k, (o, size) in enumerate(shapes, start=1):
        conv(f"{key}.conv{k}", (block, f"conv{k}"), o, c, size)
        bn(f"{key}.bn{k}", (block, f"bn{k}"), o)
        c = o
      strided = i > 1 and j == 0
      if strided or c_in != width * expansion:
        conv(f"{key}.downsample.0", (block, "downsample"), width * expansion, c_in, 1)
        bn(f"{key}.downsample.1", (block, "downsample_bn"), width * expansion)
      c_in = width * expansion
  rows.append(Entry("fc.weight", (num_classes, c_in), "params", ("head", "kernel"), "dense"))
  rows.append(Entry("fc.bias", (num_classes,), "params", ("head", "bias"), "vector"))
  return rows


# ----------------------------------------------------------------------------- reading


def _check_file(path: str) -> None:
  if not path.endswith(SUFFIXES):
    raise PretrainedError(f"{path}: not a {', '.join(SUFFIXES)} file (a saved state_dict)")
  if not os.path.isfile(path):
    raise PretrainedError(f"{path}: no such file")


def _torch_load(path: str) -> dict[str, Any]:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise PretrainedError(
      f"{path}: reading .pth needs torch (pip install 'qnet[pth]'), or save the state_dict "
      "as .safetensors (safetensors.torch.save_file(model.state_dict(), PATH))"
    ) from None
  try:
    # mmap: shapes are read without loading the data (the check runs before any compute).
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
  except Exception as e:  # noqa: BLE001 - any unreadable file is one line
    raise PretrainedError(f"{path}: torch.load failed: {' '.join(str(e).split())[:300]}") from None
  if not isinstance(obj, dict) or not all(
    isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
  ):
    keys = list(obj)[:4] if isinstance(obj, dict) else type(obj).__name__
    raise PretrainedError(
      f"{path}: not a state_dict (a flat mapping of tensor names to tensors; found {keys}); "
      "save model.state_dict()"
    )
  return obj


def read_shapes(path: str) -> dict[str, tuple[int, ...]]:
  """Every tensor's shape, in file order, without reading the data."""
  _check_file(path)
  if path.endswith(".safetensors"):
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel

    try:
      with safe_open(path, framework="np") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any unreadable file is one line
      raise PretrainedError(f"{path}: not a safetensors file ({e})") from None
  return {k: tuple(v.shape) for k, v in _torch_load(path).items()}


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """The tensors of a `.safetensors` or `.pth` state_dict as numpy arrays (dtypes kept)."""
  _check_file(path)
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel

    return dict(load_file(path))
  return {k: v.detach().cpu().numpy() for k, v in _torch_load(path).items()}


# ----------------------------------------------------------------------------- checking


def _guess_arch(shapes: dict[str, tuple[int, ...]]) -> str:
  """What the file looks like, for the error message."""
  if "conv1.0.weight" in shapes:
    return "a ResNet-C/D deep stem (conv1.0/conv1.3/conv1.6), not torchvision's 7x7 stem"
  if not any(k.startswith("layer1.") for k in shapes):
    first = next(iter(shapes), "nothing")
    return f"not a ResNet state_dict (its first key: {first})"
  blocks = []
  for i in range(1, 5):
    js = {int(m.group(1)) for k in shapes if (m := re.match(rf"layer{i}\.(\d+)\.", k))}
    blocks.append(len(js))
  kind = "bottleneck" if "layer1.0.conv3.weight" in shapes else "basic"
  for name, (sizes, k) in _archs().items():
    if tuple(blocks) == sizes and k == kind:
      return f"the file looks like {name[3:]} (model={name})"
  return f"the file has {kind} blocks {tuple(blocks)} per stage"


def check(table: list[Entry], shapes: dict[str, tuple[int, ...]], model: str) -> None:
  """Raises `PretrainedError` on the first key that is missing, has the wrong shape or is
  not used by the table (after dropping `num_batches_tracked`)."""
  expected = {e.key for e in table}
  problem = None
  for e in table:
    if e.key not in shapes:
      problem = f"{e.key}: missing (expected shape {list(e.shape)})"
    elif shapes[e.key] != e.shape:
      problem = f"{e.key}: shape {list(shapes[e.key])}, expected {list(e.shape)}"
    if problem:
      break
  if problem is None:
    extra = [k for k in shapes if k not in expected and not k.endswith("." + _DROPPED)]
    # Natural order: the same first key from a .pth (module order) and a .safetensors (sorted).
    extra.sort(key=lambda k: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", k)])
    if extra:
      problem = f"{extra[0]}: unexpected key ({len(extra)} unused)"
  if problem:
    raise PretrainedError(f"{problem} for {model}; {_guess_arch(shapes)}")


def to_variables(
  table: list[Entry], state: dict[str, np.ndarray]
) -> tuple[dict[str, Any], dict[str, Any]]:
  """(params, batch_stats) as nested dicts of float32 numpy arrays, in qnet's layouts."""
  out: dict[str, dict] = {"params": {}, "batch_stats": {}}
  for e in table:
    value = np.asarray(state[e.key], np.float32)
    if e.layout == "conv":
      value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    elif e.layout == "dense":
      value = value.T
    node = out[e.collection]
    for part in e.path[:-1]:
      node = node.setdefault(part, {})
    node[e.path[-1]] = np.ascontiguousarray(value)
  return out["params"], out["batch_stats"]


def check_file(value: str, model: str, in_channels: int, num_classes: int) -> list[Entry]:
  """The table for `init_from=value` (`torchvision:PATH` / `timm:PATH`) after checking the
  file's keys and shapes (no data read); `PretrainedError` on the first problem."""
  parsed = parse_init_from(value)
  if parsed is None:
    raise PretrainedError(f"{value!r} is not SOURCE:PATH with SOURCE one of {', '.join(SOURCES)}")
  table = key_table(model, in_channels, num_classes)
  check(table, read_shapes(parsed[1]), model)
  return table


def load(
  value: str, model: str, in_channels: int, num_classes: int
) -> tuple[dict[str, Any], dict[str, Any]]:
  """(params, batch_stats) of qnet model `model` from `init_from=value`, checked first."""
  table = check_file(value, model, in_channels, num_classes)
  return to_variables(table, read_state_dict(parse_init_from(value)[1]))
