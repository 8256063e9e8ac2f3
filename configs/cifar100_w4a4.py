"""CIFAR-100, pre-activation ResNet-20 at W4A4: the paper's released CIFAR-100 baseline recipe.

  python -m qnet.main --config=configs/cifar100_w4a4.py --workdir=/tmp/cifar100_w4a4

200 epochs, batch 128, SGD momentum 0.9, weight decay 1e-4, lr 0.1 divided by 10 at epochs
60 and 120 (paper.md, "Released settings", baseline without distillation); first and last
layers full precision. Needs TFDS's `cifar100` prepared (`tfds build cifar100`).
Time: ~78k steps; on one modern GPU well under an hour, on 2 CPU cores days (not a CPU job).
Target: the paper's CIFAR-100 ResNet-20 results (see README "Paper recipes").
"""

from configs import default


def get_config():
  c = default.get_config()
  c.dataset = "cifar100"
  c.model = "resnet20"
  c.batch_size = 128
  c.num_epochs = 200.0
  c.learning_rate = 0.1
  c.weight_decay = 1e-4
  c.lr_schedule = "step"
  c.lr_step_at = (60 / 200, 120 / 200)
  c.quant.weight_bits = 4
  c.quant.act_bits = 4
  c.eval_every_steps = 1950  # ~5 epochs
  c.checkpoint_every_steps = 1950
  return c
