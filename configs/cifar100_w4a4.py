"""CIFAR-100, pre-activation ResNet-20 W4A4: the authors' released baseline recipe.

  python -m qnet.main --config=configs/cifar100_w4a4.py --workdir=DIR

Data: TFDS `cifar100` (downloaded by TFDS on first use, or prepared under
`--config.data_dir` on an offline cluster). Settings: `configs/paper_recipes.py`, variant
`cifar100_resnet20_w4` (this file is that variant: one source): 200 epochs, batch 128,
SGD 0.9, lr 0.1 / 10 at epochs 60 and 120, wd 1e-4, about 78k steps. The W4A4 student
with the joint teacher is `configs/paper_recipes.py:cifar100_resnet20_kd`. Not run here
(no accelerator); the paper's CIFAR-100 figures: qnet/METHOD.md, "What the paper reports".
"""

from configs import paper_recipes


def get_config():
  return paper_recipes.get_config("cifar100_resnet20_w4")
