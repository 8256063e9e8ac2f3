"""Fashion-MNIST, full precision: same model, budget and recipe as fashion_mnist_w4a4.py.

  python -m qnet.main --config=configs/fashion_mnist_fp.py --workdir=/tmp/fmnist_fp

32-bit weights and clip-ReLU activations everywhere (the paper's FP reference; set
`--config.model_act=relu` for the plain FP network without quantizers). Measured: eval_accuracy
0.9199 (seed 0; 10 min 18 s, sharing the 2 cores with a benchmark), 0.9209 and 0.9209 (seeds
1, 2; 415 s and 372 s).
"""

from configs import fashion_mnist_w4a4


def get_config():
  c = fashion_mnist_w4a4.get_config()
  c.quant.weight_bits = 32
  c.quant.act_bits = 32
  return c
