"""torchvision / timm ResNets into qnet (`tv_resnet*`, `init_from=torchvision:PATH`).

Reference outputs come from PyTorch itself: tests/torch_reference.py runs as a subprocess in a
separate torch venv (`.venv-torch`, made by `.ci/run`; or `QNET_TORCH_PYTHON`). Without it these
tests skip, except under CI=true, where they fail. The rest use state_dicts written here from
the key table with random values (no torch needed).
"""

import functools
import os
import pathlib
import re
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from qnet import models
from qnet.models import pretrained, tv_resnet
from qnet.quant import precision
from qnet.train import build, config_validation, loop, metrics_io
from test_loop import mock_config, run

ROOT = pathlib.Path(__file__).parents[1]
TORCH_PYTHON = os.environ.get("QNET_TORCH_PYTHON") or str(ROOT / ".venv-torch" / "bin" / "python")
# torchvision's own parameter counts (its docs) for the 3-channel, 1000-class networks.
TORCHVISION_PARAMS = {
  "tv_resnet18": 11_689_512,
  "tv_resnet34": 21_797_672,
  "tv_resnet50": 25_557_032,
}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> pathlib.Path:
  """The PyTorch reference files (tests/torch_reference.py), made once per module."""
  if not os.access(TORCH_PYTHON, os.X_OK):
    why = f"no torch venv at {TORCH_PYTHON} (.ci/run makes it; or set QNET_TORCH_PYTHON)"
    if os.environ.get("CI") == "true":
      pytest.fail(f"CI=true: {why}")
    pytest.skip(why)
  out = tmp_path_factory.mktemp("torch_reference")
  subprocess.run(
    [TORCH_PYTHON, str(ROOT / "tests" / "torch_reference.py"), str(out)],
    check=True,
    env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
  )
  return out


def synthetic_state_dict(model: str, in_channels: int, classes: int, seed: int = 0) -> dict:
  """A state_dict in torch layout with random values (He-scaled kernels), from the key table,
  plus BatchNorm's `num_batches_tracked` counters as torch writes them."""
  rng = np.random.default_rng(seed)
  state = {}
  for e in pretrained.key_table(model, in_channels, classes):
    if e.layout == "conv":
      v = rng.standard_normal(e.shape) * np.sqrt(2.0 / np.prod(e.shape[1:]))
    elif e.layout == "dense":
      v = rng.standard_normal(e.shape) * 0.05
    elif e.key.endswith(("running_var", ".weight")):
      v = rng.uniform(0.5, 1.5, e.shape)
    else:
      v = rng.standard_normal(e.shape) * 0.1
    state[e.key] = v.astype(np.float32)
    if e.key.endswith("running_var"):
      state[e.key.replace("running_var", "num_batches_tracked")] = np.array(7, np.int64)
  return state


def write(tmp_path, name: str, state: dict) -> str:
  path = str(tmp_path / f"{name}.safetensors")
  save_file(state, path)
  return path


@functools.lru_cache(maxsize=None)
def qnet_outputs(ref_dir: str, name: str, size: int) -> dict[str, np.ndarray]:
  """The imported `name`'s logits and stage outputs (`stem`: after the max-pool, the first
  block's input; `layer1..4`: each stage's last block) on the reference's input at `size`."""
  model_name = "tv_resnet50" if "50" in name else "tv_resnet18"
  params, stats = pretrained.load(f"torchvision:{ref_dir}/{name}.safetensors", model_name, 3, 1000)
  x = np.load(f"{ref_dir}/{name}.npz")[f"x_{size}"]
  model = models.create_model(model_name, 1000, act="relu")
  prec = precision.full_precision(precision.layout_of(model, jnp.zeros((1, size, size, 3))))
  ends = {m: f"layer{i + 1}" for i, m in enumerate(tv_resnet.stage_outputs(model_name[3:]))}

  def forward(params, stats, x):
    got = {}

    def record(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if context.method_name == "__call__":
        if context.module.name == "stage1_block1":
          got["stem"] = args[0]
        if context.module.name in ends:
          got[ends[context.module.name]] = out
      return out

    with flax.linen.intercept_methods(record):
      got["logits"] = model.apply(
        {"params": params, "batch_stats": stats, "precision": prec}, x, train=False
      )
    return got

  return {k: np.asarray(v) for k, v in jax.jit(forward)(params, stats, x).items()}


# ----------------------------------------------------------------------------- the key table


@pytest.mark.parametrize("name", ["tv_resnet18", "tv_resnet34", "tv_resnet50"])
@pytest.mark.heavy
def test_key_table_fills_every_qnet_leaf_exactly_once(name):
  for channels, classes in ((3, 1000), (1, 10)):
    table = pretrained.key_table(name, channels, classes)
    model = models.create_model(name, classes)
    v = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False), jnp.zeros((1, 64, 64, channels))
    )
    want = flax.traverse_util.flatten_dict({"params": v["params"], "batch_stats": v["batch_stats"]})
    keys = [e.key for e in table]
    assert len(keys) == len(set(keys))
    got = {}
    for e in table:
      shape = {"conv": lambda s: (s[2], s[3], s[1], s[0]), "dense": lambda s: s[::-1]}.get(
        e.layout, lambda s: s
      )(e.shape)
      got[(e.collection, *e.path)] = shape
    assert got == {k: a.shape for k, a in want.items()}
    if channels == 3:
      count = sum(int(np.prod(e.shape)) for e in table if e.collection == "params")
      assert count == TORCHVISION_PARAMS[name]


# ----------------------------------------------------------------------------- against PyTorch


@pytest.mark.parametrize("size", [224, 97])
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "timm_resnet18"])
@pytest.mark.heavy
def test_logits_and_every_stage_equal_pytorch(ref, name, size):
  """Random BN statistics and affine parameters, eval mode, random inputs: each stage (in
  order, to locate a failure), then the logits, within 1e-4 of their scale; same argmax."""
  torch_out = np.load(ref / f"{name}.npz")
  got = qnet_outputs(str(ref), name, size)
  for stage in ("stem", "layer1", "layer2", "layer3", "layer4", "logits"):
    want = torch_out[f"{stage}_{size}"]
    assert got[stage].shape == want.shape, stage
    err = np.abs(got[stage] - want).max() / np.abs(want).max()
    assert err <= 1e-4, (stage, err)
  np.testing.assert_array_equal(got["logits"].argmax(1), torch_out[f"logits_{size}"].argmax(1))


def test_v1_checkpoint_loads_but_is_another_function(ref):
  """A ResNet v1 state_dict (stride on the bottleneck's first 1x1) has v1.5's keys and shapes,
  so the importer cannot reject it: it assumes v1.5 (documented in qnet.models.pretrained)."""
  table = pretrained.check_file(f"torchvision:{ref}/resnet50.safetensors", "tv_resnet50", 3, 1000)
  assert table
  got = qnet_outputs(str(ref), "resnet50", 224)["logits"]
  v1 = np.load(ref / "resnet50_v1.npz")["logits_224"]
  assert np.abs(got - v1).max() / np.abs(v1).max() > 1e-2


@pytest.mark.parametrize("name", ["resnet18", "timm_resnet18"])
def test_pth_and_safetensors_give_bitwise_equal_parameters(ref, name):
  """NAME_pth.npz is qnet's `read_state_dict` of NAME.pth run in the torch venv
  (torch.load(weights_only=True)); the .safetensors is read here without torch."""
  table = pretrained.key_table("tv_resnet18", 3, 1000)
  from_pth = pretrained.to_variables(table, dict(np.load(ref / f"{name}_pth.npz")))
  from_st = pretrained.to_variables(
    table, pretrained.read_state_dict(str(ref / f"{name}.safetensors"))
  )
  a, b = jax.tree.leaves(from_pth), jax.tree.leaves(from_st)
  assert jax.tree.structure(from_pth) == jax.tree.structure(from_st)
  assert all(x.dtype == y.dtype == np.float32 and x.tobytes() == y.tobytes() for x, y in zip(a, b))


def test_pth_reader_reads_shapes_and_rejects_what_is_not_a_state_dict_in_one_line(ref):
  """`read_shapes` of a .pth (torch.load with mmap: no data read) equals the .safetensors'
  shapes; a list of tensors and a torn file are one line each (run in the torch venv)."""
  import json

  got = json.loads((ref / "pth_reader.json").read_text())
  want = pretrained.read_shapes(str(ref / "resnet18.safetensors"))
  assert {k: tuple(v) for k, v in got["resnet18_shapes"].items()} == want
  assert list(got["resnet18_shapes"])[:2] == ["conv1.weight", "bn1.weight"]  # module order
  errors = got["errors"]
  assert errors["list"].endswith(
    "list.pth: not a state_dict (a flat mapping of tensor names to tensors; found list); "
    "save model.state_dict()"
  )
  assert "torn.pth: torch.load failed: " in errors["torn"]
  assert all("\n" not in e for e in errors.values())


@pytest.mark.parametrize(
  "file,model,channels,classes,message",
  [
    ("resnet34", "tv_resnet18", 3, 1000, "layer1.2.bn1.bias: unexpected key"),
    ("resnet34", "tv_resnet18", 3, 1000, "looks like resnet34 (model=tv_resnet34)"),
    (
      "resnet18",
      "tv_resnet34",
      3,
      1000,
      "layer1.2.conv1.weight: missing (expected shape [64, 64, 3, 3])",
    ),
    (
      "resnet50",
      "tv_resnet18",
      3,
      1000,
      "layer1.0.conv1.weight: shape [64, 64, 1, 1], expected [64, 64, 3, 3]",
    ),
    (
      "timm_resnet50d",
      "tv_resnet50",
      3,
      1000,
      "conv1.weight: missing (expected shape [64, 3, 7, 7])",
    ),
    ("timm_resnet50d", "tv_resnet50", 3, 1000, "ResNet-C/D deep stem"),
    ("mobilenet_v3_small", "tv_resnet18", 3, 1000, "not a ResNet state_dict"),
    ("resnet18", "tv_resnet18", 1, 10, "conv1.weight: shape [64, 3, 7, 7], expected [64, 1, 7, 7]"),
  ],
)
def test_torch_files_that_cannot_start_the_model_are_one_line(
  ref, file, model, channels, classes, message
):
  with pytest.raises(pretrained.PretrainedError) as info:
    pretrained.check_file(f"torchvision:{ref}/{file}.safetensors", model, channels, classes)
  assert message in str(info.value) and "\n" not in str(info.value)


# ----------------------------------------------------------------------------- without torch


def test_synthetic_strict_key_errors(tmp_path):
  state = synthetic_state_dict("tv_resnet18", 3, 10)
  ok = write(tmp_path, "ok", state)
  pretrained.check_file(f"timm:{ok}", "tv_resnet18", 3, 10)  # num_batches_tracked dropped
  cases = {
    "extra": (
      {**state, "layer4.1.se.fc1.weight": np.zeros((8, 512), np.float32)},
      "layer4.1.se.fc1.weight: unexpected key (1 unused)",
    ),
    "missing": (
      {k: v for k, v in state.items() if k != "fc.bias"},
      "fc.bias: missing (expected shape [10])",
    ),
  }
  for name, (bad, message) in cases.items():
    with pytest.raises(pretrained.PretrainedError, match=re.escape(message)):
      pretrained.check_file(f"torchvision:{write(tmp_path, name, bad)}", "tv_resnet18", 3, 10)
  with pytest.raises(
    pretrained.PretrainedError,
    match="cannot load a torchvision/timm ResNet; use one of tv_resnet18, tv_resnet34, tv_resnet50$",
  ):
    pretrained.check_file(f"torchvision:{ok}", "resnet18", 3, 10)
  with pytest.raises(pretrained.PretrainedError, match="no such file"):
    pretrained.check_file(f"torchvision:{tmp_path}/none.safetensors", "tv_resnet18", 3, 10)


def test_to_variables_puts_each_torch_element_where_qnet_reads_it():
  """Index arithmetic, not the importer's own transposes: torch conv [o, i, h, w] is qnet
  [h, w, i, o], the fc [o, i] is [i, o], BatchNorm's four vectors go to scale/bias/mean/var;
  every value float32 and C-contiguous whatever the file's dtype."""
  table = pretrained.key_table("tv_resnet18", 1, 10)
  state = synthetic_state_dict("tv_resnet18", 1, 10, seed=5)
  state["fc.weight"] = state["fc.weight"].astype(np.float16)  # a half-precision file
  state["bn1.running_var"] = state["bn1.running_var"].astype(np.float64)
  params, stats = pretrained.to_variables(table, state)
  rng = np.random.default_rng(0)
  for e in table:
    node = {"params": params, "batch_stats": stats}[e.collection]
    for part in e.path:
      node = node[part]
    assert node.dtype == np.float32 and node.flags.c_contiguous, e.key
    want = state[e.key]
    for _ in range(3):
      idx = tuple(int(rng.integers(n)) for n in e.shape)
      at = {"conv": lambda i: (i[2], i[3], i[1], i[0]), "dense": lambda i: i[::-1]}.get(
        e.layout, lambda i: i
      )(idx)
      assert node[at] == np.float32(want[idx]), (e.key, idx)
  assert stats["stem_bn"]["var"].tobytes() == state["bn1.running_var"].astype(np.float32).tobytes()
  assert set(params["stem_bn"]) == {"scale", "bias"} and set(stats["stem_bn"]) == {"mean", "var"}
  assert params["stem_bn"]["scale"].tobytes() == state["bn1.weight"].tobytes()
  assert params["stem_bn"]["bias"].tobytes() == state["bn1.bias"].tobytes()
  assert stats["stem_bn"]["mean"].tobytes() == state["bn1.running_mean"].tobytes()


def test_key_table_rows_and_downsamples():
  """File order and the shortcut rule: a 1x1 `downsample` where the stride or the width
  changes (every stage's first block of a ResNet-50, stages 2-4 of a ResNet-18), nowhere else."""
  r18 = pretrained.key_table("tv_resnet18", 1, 10)
  assert [e.key for e in r18[:6]] == [
    "conv1.weight",
    "bn1.weight",
    "bn1.bias",
    "bn1.running_mean",
    "bn1.running_var",
    "layer1.0.conv1.weight",
  ]
  assert r18[0] == pretrained.Entry(
    "conv1.weight", (64, 1, 7, 7), "params", ("stem", "kernel"), "conv"
  )
  assert r18[-2:] == [
    pretrained.Entry("fc.weight", (10, 512), "params", ("head", "kernel"), "dense"),
    pretrained.Entry("fc.bias", (10,), "params", ("head", "bias"), "vector"),
  ]
  assert {e.layout for e in r18 if e.key.endswith(("bias", "weight", "mean", "var"))} == {
    "conv",
    "dense",
    "vector",
  }
  assert all(e.layout == "vector" for e in r18 if len(e.shape) == 1)
  down = lambda t: [e.key for e in t if e.key.endswith("downsample.0.weight")]
  assert down(r18) == [f"layer{i}.0.downsample.0.weight" for i in (2, 3, 4)]
  r50 = pretrained.key_table("tv_resnet50", 3, 1000)
  assert down(r50) == [f"layer{i}.0.downsample.0.weight" for i in (1, 2, 3, 4)]
  by_key = {e.key: e for e in r50}
  assert by_key["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
  assert by_key["layer2.0.conv1.weight"].shape == (128, 256, 1, 1)
  assert by_key["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)  # v1.5: the stride is here
  assert by_key["layer2.0.downsample.1.running_var"].path == (
    "stage2_block1",
    "downsample_bn",
    "var",
  )
  assert by_key["layer4.2.bn3.weight"].collection == "params"
  assert by_key["fc.weight"].shape == (1000, 2048)


@pytest.mark.heavy
def test_what_a_rejected_file_looks_like_is_named(tmp_path):
  """The message's second half (`_guess_arch`), on files written here: another depth, a
  deep stem, a non-ResNet, a depth no model has; and which key is named first."""

  def message(state, model="tv_resnet18"):
    with pytest.raises(pretrained.PretrainedError) as info:
      pretrained.check_file(f"torchvision:{write(tmp_path, 'f', state)}", model, 3, 10)
    assert "\n" not in str(info.value)
    return str(info.value)

  r34 = synthetic_state_dict("tv_resnet34", 3, 10)
  assert message(r34).endswith("for tv_resnet18; the file looks like resnet34 (model=tv_resnet34)")
  r50 = synthetic_state_dict("tv_resnet50", 3, 10)
  assert message(r50, "tv_resnet34").endswith("the file looks like resnet50 (model=tv_resnet50)")
  r18 = synthetic_state_dict("tv_resnet18", 3, 10)
  deep = {k: v for k, v in r18.items() if k != "conv1.weight"}
  deep["conv1.0.weight"] = np.zeros((32, 3, 3, 3), np.float32)
  assert message(deep).startswith(
    "conv1.weight: missing (expected shape [64, 3, 7, 7]) for tv_resnet18; a ResNet-C/D deep stem"
  )
  assert message({"features.0.weight": np.zeros((8, 3, 3, 3), np.float32)}).endswith(
    "not a ResNet state_dict (its first key: features.0.weight)"
  )
  assert message({}).endswith("not a ResNet state_dict (its first key: nothing)")
  short = {k: v for k, v in r18.items() if not k.startswith("layer3.1.")}
  assert message(short).endswith("the file has basic blocks (2, 2, 1, 2) per stage")
  bottleneck = {k: v for k, v in r50.items() if not k.startswith("layer4.2.")}
  assert message(bottleneck, "tv_resnet50").endswith(
    "the file has bottleneck blocks (3, 4, 6, 2) per stage"
  )
  # Missing or wrong-shaped keys come before unused ones; unused ones in natural order.
  extra = {**r18, "layer10.0.x": np.zeros(1, np.float32), "layer9.0.x": np.zeros(1, np.float32)}
  assert message(extra).startswith("layer9.0.x: unexpected key (2 unused) for tv_resnet18; ")
  both = {**extra, "fc.bias": np.zeros(11, np.float32)}
  assert message(both).startswith("fc.bias: shape [11], expected [10] for tv_resnet18; ")


def test_init_from_values_and_file_names(tmp_path):
  assert pretrained.parse_init_from("torchvision:/w/r18.pth") == ("torchvision", "/w/r18.pth")
  assert pretrained.parse_init_from("timm:a:b.safetensors") == ("timm", "a:b.safetensors")
  assert pretrained.parse_init_from("/runs/fp") is None  # a qnet workdir
  assert pretrained.parse_init_from("gs://bucket/run") is None
  assert pretrained.parse_init_from("torchvision") is None
  for bad, text in (
    ("r18.ckpt", "not a .safetensors, .pth, .pt file"),
    ("none.pt", "no such file"),
  ):
    with pytest.raises(pretrained.PretrainedError, match=re.escape(f"{bad}: {text}")):
      pretrained.read_shapes(bad)
  garbage = tmp_path / "r18.safetensors"
  garbage.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
  with pytest.raises(pretrained.PretrainedError, match="r18.safetensors: not a safetensors file"):
    pretrained.read_shapes(str(garbage))
  with pytest.raises(
    pretrained.PretrainedError,
    match=r"^'r18.pth' is not SOURCE:PATH with SOURCE one of torchvision, timm$",
  ):
    pretrained.check_file("r18.pth", "tv_resnet18", 3, 10)


@pytest.mark.heavy
def test_cli_rejects_a_mismatched_file_in_one_line_with_exit_2_before_any_compute(tmp_path):
  path = write(tmp_path, "r34", synthetic_state_dict("tv_resnet34", 1, 10))
  workdir = tmp_path / "run"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "qnet.main",
      "--config=configs/fashion_mnist_w4a4.py",
      "--config.model=tv_resnet18",
      f"--config.init_from=torchvision:{path}",
      f"--workdir={workdir}",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert lines[-1].startswith("qnet: config error: config.init_from='torchvision:")
  assert "layer1.2.bn1.bias: unexpected key" in lines[-1]
  assert not workdir.exists()  # stopped before the workdir lock, data or compilation


def _fresh_state(config, tmp_path):
  total = loop.total_train_steps(config)[0]
  students, teacher = build.build_specs(config, max(total, 1))
  meta = build.run_meta(config, students, teacher)
  return loop.initial_state(config, str(tmp_path), students, teacher, build.create_mesh(), meta)[1]


@pytest.mark.heavy
def test_init_from_starts_student_and_teacher_bitwise_equal_to_the_file(tmp_path):
  import tensorflow_datasets as tfds

  state_dict = synthetic_state_dict("tv_resnet18", 3, 10, seed=1)
  path = write(tmp_path, "r18", state_dict)
  c = mock_config(model="tv_resnet18", init_from=f"torchvision:{path}", **{"distill.enabled": True})
  config_validation.validate(c, jax.device_count())
  with tfds.testing.mock_data(num_examples=64):
    state = _fresh_state(c, tmp_path / "w")
  want_p, want_b = pretrained.to_variables(pretrained.key_table("tv_resnet18", 3, 10), state_dict)
  for net in (state.students[0], state.teacher):
    for got, want in ((net.params, want_p), (net.batch_stats, want_b)):
      g, w = (
        flax.traverse_util.flatten_dict(jax.device_get(got)),
        flax.traverse_util.flatten_dict(want),
      )
      assert g.keys() == w.keys()
      assert all(np.asarray(g[k]).tobytes() == w[k].tobytes() for k in w)
  assert (
    state_dict["fc.weight"].T.tobytes()
    == np.asarray(state.teacher.params["head"]["kernel"]).tobytes()
  )


@pytest.mark.heavy
def test_teacher_from_a_file_is_a_frozen_teacher_bitwise_equal_to_it(tmp_path):
  import tensorflow_datasets as tfds

  state_dict = synthetic_state_dict("tv_resnet18", 3, 10, seed=3)
  path = write(tmp_path, "r18", state_dict)
  c = mock_config(
    model="tv_resnet18",
    **{
      "distill.enabled": True,
      "distill.teacher_from": f"timm:{path}",
      "distill.teacher_act": "relu",
    },
  )
  config_validation.validate(c, jax.device_count())
  with tfds.testing.mock_data(num_examples=64):
    state = _fresh_state(c, tmp_path / "w")
  want_p, want_b = pretrained.to_variables(pretrained.key_table("tv_resnet18", 3, 10), state_dict)
  for got, want in ((state.teacher.params, want_p), (state.teacher.batch_stats, want_b)):
    g, w = (
      flax.traverse_util.flatten_dict(jax.device_get(got)),
      flax.traverse_util.flatten_dict(want),
    )
    assert g.keys() == w.keys() and all(np.asarray(g[k]).tobytes() == w[k].tobytes() for k in w)
  student = np.asarray(state.students[0].params["head"]["kernel"])
  assert student.tobytes() != state_dict["fc.weight"].T.tobytes()  # the student starts fresh
  bad = mock_config(
    model="tv_resnet34", **{"distill.enabled": True, "distill.teacher_from": f"torchvision:{path}"}
  )
  with pytest.raises(config_validation.ConfigError, match=r"^config\.distill\.teacher_from="):
    config_validation.validate(bad, jax.device_count())


@pytest.mark.heavy
def test_zero_steps_evaluates_the_imported_network_at_step_0(tmp_path):
  """`num_train_steps=0`: no step, no checkpoint; `eval_accuracy` at step 0 equals the
  imported variables applied by hand to the same eval split."""
  import tensorflow_datasets as tfds
  from qnet.data import input_pipeline

  state_dict = synthetic_state_dict("tv_resnet18", 3, 10, seed=2)
  path = write(tmp_path, "r18", state_dict)
  c = mock_config(
    model="tv_resnet18",
    model_act="relu",
    num_train_steps=0,
    init_from=f"torchvision:{path}",
    **{"quant.weight_bits": 32, "quant.act_bits": 32},
  )
  result = run(c, tmp_path / "w")
  rows = metrics_io.read_jsonl(tmp_path / "w" / "metrics.jsonl")
  evals = [r for r in rows if "eval_accuracy" in r]
  assert [r["step"] for r in evals] == [0]
  assert [r["train_step_compiles"] for r in rows if "train_step_compiles" in r] == [0]
  assert not (tmp_path / "w" / "checkpoints").exists() or not os.listdir(
    tmp_path / "w" / "checkpoints"
  )
  params, stats = pretrained.load(c.init_from, "tv_resnet18", 3, 10)
  model = models.create_model("tv_resnet18", 10, act="relu")
  correct = total = 0
  with tfds.testing.mock_data(num_examples=64):
    for batch in input_pipeline.create_eval_iterator("cifar10", global_batch_size=16):
      prec = precision.full_precision(precision.layout_of(model, jnp.zeros((1, 32, 32, 3))))
      logits = model.apply(
        {"params": params, "batch_stats": stats, "precision": prec}, batch["image"], train=False
      )
      correct += float(np.sum((np.argmax(logits, 1) == batch["label"]) * batch["mask"]))
      total += float(np.sum(batch["mask"]))
  assert evals[0]["eval_examples"] == total
  assert abs(evals[0]["eval_accuracy"] - correct / total) < 1e-6
  assert result["eval_accuracy"] == evals[0]["eval_accuracy"]


@pytest.mark.slow
def test_w4a4_fine_tune_from_an_import_lowers_the_loss_with_one_compile(tmp_path):
  state_dict = synthetic_state_dict("tv_resnet18", 3, 10, seed=3)
  path = write(tmp_path, "r18", state_dict)
  c = mock_config(
    model="tv_resnet18",
    init_from=f"torchvision:{path}",
    num_train_steps=16,
    train_examples=16,
    log_every_steps=1,
    eval_every_steps=16,
    checkpoint_every_steps=100,
    augment=False,
    learning_rate=0.03,
  )
  run(c, tmp_path / "w")
  rows = metrics_io.read_jsonl(tmp_path / "w" / "metrics.jsonl")
  losses = [r["train_loss"] for r in rows if "train_loss" in r]
  assert len(losses) == 16  # the same 16 examples each step: W4A4 fits them
  assert np.mean(losses[-4:]) < 0.95 * np.mean(losses[:4]), losses
  assert [r["train_step_compiles"] for r in rows if "train_step_compiles" in r] == [1]


@pytest.mark.slow
def test_imported_network_exports_with_integer_layers_equal_to_fake_quant():
  """The traced export (qnet.deploy.lowering) takes the imported post-activation network: its
  integer program's layers, requants and logits equal the W4A4 fake-quant network's."""
  from test_export import bits_for, check_against_fake_quant

  from qnet.data.datasets import DATASETS
  from qnet.deploy import lowering

  ds, shape = DATASETS["fashion_mnist"], (28, 28, 1)
  state_dict = synthetic_state_dict("tv_resnet18", 1, 10, seed=4)
  params, stats = pretrained.to_variables(pretrained.key_table("tv_resnet18", 1, 10), state_dict)
  model = models.create_model("tv_resnet18", 10)
  bits, tree = bits_for(model, shape, 4, 4, True)
  program = lowering.build_program(
    model, params, stats, bits, input_shape=shape, mean=ds.mean, std=ds.std
  )
  # Its 8 residual blocks carry a tie's consequence through the float stream (the layer-by-layer
  # check is forced on the fake-quant codes and stays tight): top-1 equal, logits within 30%.
  check_against_fake_quant(
    program, model, params, stats, tree, ds, shape, require_requant=True, logits_rtol=0.3
  )
