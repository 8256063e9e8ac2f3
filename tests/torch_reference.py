"""PyTorch side of tests/test_pretrained.py: runs in the torch venv (torch, torchvision, timm,
safetensors; no jax), never inside qnet's venvs.

  .venv-torch/bin/python tests/torch_reference.py OUT_DIR

Writes into OUT_DIR, for torchvision's resnet18 and resnet50 (and timm's resnet18 when timm is
installed), each built offline with `weights=None`, every BatchNorm's weight, bias, running mean
and running variance randomised first:
- NAME.safetensors and (resnet18s) NAME.pth: the state_dict;
- NAME.npz: random NCHW inputs at 224 and at 97 (odd at every stride), their eval-mode logits
  and the outputs of the stem (after the max-pool) and of layer1..4, all transposed to NHWC;
- NAME_pth.npz (resnet18s): qnet's own `read_state_dict` of NAME.pth (its torch.load path, which needs torch);
- pth_reader.json: qnet's `read_shapes` of resnet18.pth, and its one-line errors on a .pth
  that is not a state_dict (a list of tensors) and on one torch.load cannot read;
- resnet50_v1.npz: the resnet50's logits with the stride moved to the first 1x1 (ResNet v1):
  the same state_dict, another function;
- files for the importer's errors: resnet34, timm resnet50d (deep stem), a MobileNetV3.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types

import numpy as np
import torch
import torchvision
from safetensors.torch import save_file

SIZES = (224, 97)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def randomise_bn(model: torch.nn.Module, seed: int) -> None:
  """Every BN's affine parameters and running statistics random, so a mapping that swaps,
  drops or mis-orders any of them changes the logits."""
  g = torch.Generator().manual_seed(seed)
  for m in model.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      n = m.num_features
      with torch.no_grad():
        m.weight.copy_(torch.rand(n, generator=g) + 0.5)
        m.bias.copy_(torch.randn(n, generator=g) * 0.2)
        m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
        m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
        m.num_batches_tracked.fill_(1234)


def qnet_reader():
  """qnet/models/pretrained.py loaded without its package (which imports flax)."""
  for name in ("qnet", "qnet.models"):
    pkg = types.ModuleType(name)
    pkg.__path__ = [os.path.join(ROOT, *name.split("."))]
    sys.modules.setdefault(name, pkg)
  path = os.path.join(ROOT, "qnet", "models", "pretrained.py")
  spec = importlib.util.spec_from_file_location("qnet.models.pretrained", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


def nhwc(t: torch.Tensor) -> np.ndarray:
  return t.detach().numpy().transpose(0, 2, 3, 1) if t.ndim == 4 else t.detach().numpy()


def outputs(model: torch.nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
  """Logits and per-stage outputs (stem = after the max-pool, layer1..4)."""
  got = {}
  names = ("maxpool", "layer1", "layer2", "layer3", "layer4")
  hooks = [
    getattr(model, n).register_forward_hook(lambda m, i, o, n=n: got.__setitem__(n, nhwc(o)))
    for n in names
  ]
  with torch.no_grad():
    got["logits"] = nhwc(model(x))
  for h in hooks:
    h.remove()
  got["stem"] = got.pop("maxpool")
  return got


def save(model: torch.nn.Module, out: str, name: str, pth: bool = True) -> None:
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  save_file(state, os.path.join(out, f"{name}.safetensors"))
  if pth:
    torch.save(state, os.path.join(out, f"{name}.pth"))


def reference(model: torch.nn.Module, out: str, name: str, seed: int, pth: bool = True) -> None:
  randomise_bn(model, seed)
  model.eval()
  save(model, out, name, pth)
  rng = np.random.default_rng(seed)
  arrays = {}
  for size in SIZES:
    x = rng.standard_normal((2, 3, size, size), dtype=np.float32)
    arrays[f"x_{size}"] = x.transpose(0, 2, 3, 1)
    for k, v in outputs(model, torch.from_numpy(x)).items():
      arrays[f"{k}_{size}"] = v
  np.savez(os.path.join(out, f"{name}.npz"), **arrays)
  if pth:
    read = qnet_reader().read_state_dict(os.path.join(out, f"{name}.pth"))
    np.savez(os.path.join(out, f"{name}_pth.npz"), **read)


def pth_reader(out: str) -> None:
  """What qnet's .pth reader (`_torch_load`, torch-only) gives, for test_pretrained to check."""
  reader = qnet_reader()
  torch.save([torch.zeros(2)], os.path.join(out, "list.pth"))
  with open(os.path.join(out, "torn.pth"), "wb") as f:
    f.write(b"PK\x03\x04 not a zip archive")
  errors = {}
  for name in ("list", "torn"):
    try:
      reader.read_shapes(os.path.join(out, f"{name}.pth"))
    except reader.PretrainedError as e:
      errors[name] = str(e)
  shapes = reader.read_shapes(os.path.join(out, "resnet18.pth"))
  with open(os.path.join(out, "pth_reader.json"), "w") as f:
    json.dump({"resnet18_shapes": {k: list(v) for k, v in shapes.items()}, "errors": errors}, f)


def main(out: str) -> None:
  os.makedirs(out, exist_ok=True)
  torch.manual_seed(0)
  torch.set_num_threads(1)  # deterministic sums; the machine is shared
  models = torchvision.models
  reference(models.resnet18(weights=None), out, "resnet18", 1)
  pth_reader(out)
  r50 = models.resnet50(weights=None)
  reference(r50, out, "resnet50", 2, pth=False)
  # ResNet v1: stride on the first 1x1 of each downsampling bottleneck; same state_dict.
  for layer in (r50.layer2, r50.layer3, r50.layer4):
    layer[0].conv1.stride, layer[0].conv2.stride = (2, 2), (1, 1)
  x = np.load(os.path.join(out, "resnet50.npz"))["x_224"].transpose(0, 3, 1, 2)
  with torch.no_grad():
    np.savez(os.path.join(out, "resnet50_v1.npz"), logits_224=r50(torch.from_numpy(x)).numpy())
  save(models.resnet34(weights=None), out, "resnet34", pth=False)
  save(models.mobilenet_v3_small(weights=None), out, "mobilenet_v3_small", pth=False)
  try:
    import timm  # pylint: disable=import-outside-toplevel
  except ImportError:
    return
  reference(timm.create_model("resnet18", pretrained=False), out, "timm_resnet18", 3)
  save(timm.create_model("resnet50d", pretrained=False), out, "timm_resnet50d", pth=False)


if __name__ == "__main__":
  main(sys.argv[1])
