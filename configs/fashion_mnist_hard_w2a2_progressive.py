"""Fashion-MNIST hard setting (every layer quantized), W2A2 with schedule.kind=progressive
(see fashion_mnist_w2a2_progressive.py and fashion_mnist_hard_w2a2_direct.py).

  python -m qnet.main --config=configs/fashion_mnist_hard_w2a2_progressive.py --workdir=/tmp/hard_progressive
"""

from configs import fashion_mnist_hard_w2a2_direct


def get_config():
  return fashion_mnist_hard_w2a2_direct.get_config("progressive")
