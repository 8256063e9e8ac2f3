"""Fashion-MNIST hard setting (every layer quantized), W2A2 with progressive precision with LSQ:
fashion_mnist_w2a2_progressive_lsq.py in the setting of fashion_mnist_hard_w2a2_direct.py.

  python -m qnet.main --config=configs/fashion_mnist_hard_w2a2_progressive_lsq.py --workdir=/tmp/hard_progressive_lsq
"""

from configs import fashion_mnist_w2a2_progressive_lsq
from configs.fashion_mnist_hard_w2a2_direct import harden


def get_config():
  return harden(fashion_mnist_w2a2_progressive_lsq.get_config())
