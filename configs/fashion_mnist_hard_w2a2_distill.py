"""Fashion-MNIST hard setting (every layer quantized), W2A2 student with a joint FP teacher:
fashion_mnist_w2a2_distill.py in the setting of fashion_mnist_hard_w2a2_direct.py.

  python -m qnet.main --config=configs/fashion_mnist_hard_w2a2_distill.py --workdir=/tmp/hard_kd
"""

from configs import fashion_mnist_w2a2_distill
from configs.fashion_mnist_hard_w2a2_direct import harden


def get_config(kind: str = "direct"):
  return harden(fashion_mnist_w2a2_distill.get_config(kind))
