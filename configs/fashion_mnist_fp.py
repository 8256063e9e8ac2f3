"""Fashion-MNIST, full precision: same model, budget and recipe as fashion_mnist_w4a4.py.

  python -m qnet.main --config=configs/fashion_mnist_fp.py --workdir=/tmp/fmnist_fp

32-bit weights and clip-ReLU activations everywhere (the paper's FP reference; set
`--config.model_act=relu` for the plain FP network without quantizers). Measured accuracy
and time: docs/results.md.
"""

from configs import fashion_mnist_w4a4


def get_config():
  c = fashion_mnist_w4a4.get_config()
  c.quant.weight_bits = 32
  c.quant.act_bits = 32
  return c
