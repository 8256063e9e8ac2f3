"""Fashion-MNIST W2A2: stochastic precision plus joint distillation with an FP teacher.

  python -m qnet.main --config=configs/fashion_mnist_w2a2_stochastic_distill.py --workdir=/tmp/w2a2_sp_kd

Same model and total steps as fashion_mnist_w4a4.py. Measured: experiments/results/fashion_mnist.md.
"""

from configs import fashion_mnist_w2a2_distill


def get_config():
  return fashion_mnist_w2a2_distill.get_config("stochastic")
