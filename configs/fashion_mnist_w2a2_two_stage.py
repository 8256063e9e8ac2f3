"""Fashion-MNIST W2A2, two-stage: 2-bit weights with FP (clip-ReLU) activations for the first half, then W2A2 (qnet/METHOD.md remedy 1, TS).

  python -m qnet.main --config=configs/fashion_mnist_w2a2_two_stage.py --workdir=/tmp/w2a2_two_stage

Same model and total steps as fashion_mnist_w4a4.py. Expected: docs/results.md.
"""

from configs import fashion_mnist_w2a2_direct


def get_config():
  return fashion_mnist_w2a2_direct.get_config("two_stage")
