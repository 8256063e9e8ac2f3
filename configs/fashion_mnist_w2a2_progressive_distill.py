"""Fashion-MNIST W2A2: progressive precision (32 -> 8 -> 4 -> 2) plus joint distillation.

  python -m qnet.main --config=configs/fashion_mnist_w2a2_progressive_distill.py --workdir=/tmp/w2a2_pq_kd

Same model and total steps as fashion_mnist_w4a4.py. Measured accuracy and time: docs/results.md.
"""

from configs import fashion_mnist_w2a2_distill


def get_config():
  return fashion_mnist_w2a2_distill.get_config("progressive")
