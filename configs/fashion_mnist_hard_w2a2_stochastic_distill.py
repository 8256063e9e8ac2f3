"""Fashion-MNIST hard setting (every layer quantized), W2A2: schedule.kind=stochastic plus a joint
FP teacher (see fashion_mnist_hard_w2a2_distill.py).

  python -m qnet.main --config=configs/fashion_mnist_hard_w2a2_stochastic_distill.py --workdir=/tmp/hard_stochastic_kd
"""

from configs import fashion_mnist_hard_w2a2_distill


def get_config():
  return fashion_mnist_hard_w2a2_distill.get_config("stochastic")
