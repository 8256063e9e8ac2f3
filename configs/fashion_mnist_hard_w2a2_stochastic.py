"""Fashion-MNIST hard setting (every layer quantized), W2A2 with schedule.kind=stochastic
(see fashion_mnist_w2a2_stochastic.py and fashion_mnist_hard_w2a2_direct.py).

  python -m qnet.main --config=configs/fashion_mnist_hard_w2a2_stochastic.py --workdir=/tmp/hard_stochastic
"""

from configs import fashion_mnist_hard_w2a2_direct


def get_config():
  return fashion_mnist_hard_w2a2_direct.get_config("stochastic")
