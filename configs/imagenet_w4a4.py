"""ImageNet, ResNet-18 W4A4 fine-tuned with joint distillation: the paper's ImageNet recipe.

  python -m qnet.main --config=configs/imagenet_w4a4.py \
      --config.init_from=torchvision:resnet18.safetensors --workdir=DIR

Multi-host (Cloud TPU pods, SLURM): the same command on every host with QNET_DISTRIBUTED=1.
Data: TFDS `imagenet2012` prepared under `--config.data_dir` (TFDS cannot download it: put
the ILSVRC2012 tars in TFDS's manual dir and run `tfds build imagenet2012` once); without it
the run stops with one line `qnet: data error: ...` before any compute. The paper starts
both networks from a pretrained full-precision ResNet-18, torchvision's in the authors' code:
the model is `tv_resnet18` (torchvision's layout) and `--config.init_from=torchvision:PATH`
loads a state_dict saved from `torchvision.models.resnet18(weights="IMAGENET1K_V1")` (in a
torch venv: `safetensors.torch.save_file(m.state_dict(), PATH)` for a `.safetensors`, read
without torch; or `torch.save(m.state_dict(), PATH)` for a `.pth`, read with torch) into
the student and the teacher. A file that does not fit stops with one line naming the first
offending key before any compute. `--config.init_from=WORKDIR` of a qnet run works too. Settings: `configs/paper_recipes.py`, variant
`imagenet_resnet18_w4a4_kd` (this file is that variant: one source): 30 epochs at batch 256
(about 150k steps), lr 0.001 (teacher) / 0.005 (student). Expected: W4A4 at about the FP
network's accuracy (qnet/METHOD.md, "What the paper reports"); not run here (no ImageNet,
no accelerator).
"""

from configs import paper_recipes


def get_config():
  return paper_recipes.get_config("imagenet_resnet18_w4a4_kd")
