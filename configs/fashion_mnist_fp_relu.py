"""Fashion-MNIST, the plain full-precision network a user would train: ReLU activations, no
quantizer op (`model_act=relu`); same model, budget and recipe as fashion_mnist_fp.py.

  python -m qnet.main --config=configs/fashion_mnist_fp_relu.py --workdir=/tmp/fmnist_fp_relu

fashion_mnist_fp.py is the paper's FP reference (clip-ReLU, the teacher's activation); sweeps
quote their gaps against the better of the two.
"""

from configs import fashion_mnist_fp


def get_config():
  c = fashion_mnist_fp.get_config()
  c.model_act = "relu"
  return c
