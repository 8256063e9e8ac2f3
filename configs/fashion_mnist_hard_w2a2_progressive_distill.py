"""Fashion-MNIST hard setting (every layer quantized), W2A2: schedule.kind=progressive plus a joint
FP teacher (see fashion_mnist_hard_w2a2_distill.py).

  python -m qnet.main --config=configs/fashion_mnist_hard_w2a2_progressive_distill.py --workdir=/tmp/hard_progressive_kd
"""

from configs import fashion_mnist_hard_w2a2_distill


def get_config():
  return fashion_mnist_hard_w2a2_distill.get_config("progressive")
