"""Fashion-MNIST hard setting (every layer quantized), W2A2 with PACT activations (DoReFa weights), direct:
fashion_mnist_w2a2_pact.py in the setting of fashion_mnist_hard_w2a2_direct.py.

  python -m qnet.main --config=configs/fashion_mnist_hard_w2a2_pact.py --workdir=/tmp/hard_pact
"""

from configs import fashion_mnist_w2a2_pact
from configs.fashion_mnist_hard_w2a2_direct import harden


def get_config(kind: str = "direct"):
  return harden(fashion_mnist_w2a2_pact.get_config(kind))
