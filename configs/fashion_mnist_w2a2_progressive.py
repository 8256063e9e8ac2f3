"""Fashion-MNIST W2A2, progressive precision: equal stages 32 -> 8 -> 4 -> 2 bits, each starting from the previous one's weights (remedy 1, PQ).

  python -m qnet.main --config=configs/fashion_mnist_w2a2_progressive.py --workdir=/tmp/w2a2_progressive

Same model and total steps as fashion_mnist_w4a4.py. Expected: docs/results.md.
"""

from configs import fashion_mnist_w2a2_direct


def get_config():
  return fashion_mnist_w2a2_direct.get_config("progressive")
