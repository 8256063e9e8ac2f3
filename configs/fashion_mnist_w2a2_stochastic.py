"""Fashion-MNIST W2A2, stochastic precision: each step a random 50% -> 75% -> 87.5% -> 100% of the layers run at W2A2, the rest at FP (remedy 2, SP).

  python -m qnet.main --config=configs/fashion_mnist_w2a2_stochastic.py --workdir=/tmp/w2a2_stochastic

Same model and total steps as fashion_mnist_w4a4.py. Expected: docs/results.md.
"""

from configs import fashion_mnist_w2a2_direct


def get_config():
  return fashion_mnist_w2a2_direct.get_config("stochastic")
