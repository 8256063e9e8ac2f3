"""Fashion-MNIST W2A2, progressive precision (32 -> 8 -> 4 -> 2, remedy 1) with LSQ's learned
steps: the paper's remedy combined with a learned quantizer (fashion_mnist_w2a2_lsq.py). At
each phase boundary a layer's step follows the level count (qnet/quant/quantizers.py, "learned ranges").

  python -m qnet.main --config=configs/fashion_mnist_w2a2_progressive_lsq.py --workdir=/tmp/w2a2_plsq
"""

from configs import fashion_mnist_w2a2_lsq


def get_config():
  return fashion_mnist_w2a2_lsq.get_config("progressive")
