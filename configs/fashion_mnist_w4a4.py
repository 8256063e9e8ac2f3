"""Fashion-MNIST, 4-bit weights and 4-bit activations: the embedded default (offline).

  python -m qnet.main --config=configs/fashion_mnist_w4a4.py --workdir=/tmp/fmnist_w4a4

Model `fmnist_cnn`: conv 32 -> pool -> conv 64 -> pool -> conv 128 -> pool (each conv with
BN; the activation quantizer is the ReLU), a 256-unit quantized FC layer with BN, and an FP
first conv and classifier. Why this model: on 2 CPU cores a CIFAR ResNet-20 step costs
0.5-1.6 s, which allows too few steps in the 10-minute budget; this net runs ~4.3 steps/s,
so 3 epochs fit in minutes, and only one conv works at full 28x28 resolution (on 1 input
channel), which is where the CPU time goes. No augmentation: 3 epochs are too few to profit
from it (experiments/README.md). Measured accuracy and time: docs/results.md.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.dataset = "fashion_mnist"
  c.model = "fmnist_cnn"
  c.batch_size = 128
  c.num_epochs = 3.0
  c.augment = False  # 3 epochs are too few to profit from crops/flips: it only underfits
  c.learning_rate = 0.1
  c.weight_decay = 5e-4
  c.quant.weight_bits = 4
  c.quant.act_bits = 4
  c.log_every_steps = 100
  c.checkpoint_every_steps = 500
  return c
