"""Fashion-MNIST hard setting, full precision: fashion_mnist_fp_relu.py with the changes of
fashion_mnist_hard_w2a2_direct.py (the reference of the hard sweep).

  python -m qnet.main --config=configs/fashion_mnist_hard_fp_relu.py --workdir=/tmp/hard_fp_relu
"""

from configs import fashion_mnist_fp_relu
from configs.fashion_mnist_hard_w2a2_direct import harden


def get_config():
  return harden(fashion_mnist_fp_relu.get_config())
