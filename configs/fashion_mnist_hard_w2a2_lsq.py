"""Fashion-MNIST hard setting (every layer quantized), W2A2 with LSQ weights and activations, direct:
fashion_mnist_w2a2_lsq.py in the setting of fashion_mnist_hard_w2a2_direct.py.

  python -m qnet.main --config=configs/fashion_mnist_hard_w2a2_lsq.py --workdir=/tmp/hard_lsq
"""

from configs import fashion_mnist_w2a2_lsq
from configs.fashion_mnist_hard_w2a2_direct import harden


def get_config(kind: str = "direct"):
  return harden(fashion_mnist_w2a2_lsq.get_config(kind))
