"""Fashion-MNIST, 4-bit weights and 4-bit activations: the embedded default (offline).

  python -m qnet.main --config=configs/fashion_mnist_w4a4.py --workdir=/tmp/fmnist_w4a4

Model `fmnist_cnn`: a VGG-style CNN (32-32 / 64-64 conv pairs with BN and 2x2 max-pool,
a 256-unit quantized FC layer, FP first conv and classifier). Why this model: on 2 CPU
cores a CIFAR ResNet-20 step costs ~0.5 s, which allows only ~1,000 steps in the 10-minute
budget; this net reaches ~92% (FP) in ~4 epochs at a fraction of that cost, and its wide
quantized layers lose well under a point at W4A4.
Expected (measured, see README): see the README's table for wall time and accuracy.
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
