"""Fashion-MNIST W2A2, direct quantization with PACT activations (Choi et al., 2018: a learned
clipping level per layer with its L2 penalty) and DoReFa weights, as in the PACT paper.
Otherwise fashion_mnist_w2a2_direct.py.

  python -m qnet.main --config=configs/fashion_mnist_w2a2_pact.py --workdir=/tmp/w2a2_pact
"""

from configs import fashion_mnist_w2a2_direct


def get_config(kind: str = "direct"):
  c = fashion_mnist_w2a2_direct.get_config(kind)
  c.quant.act_quantizer = "pact"
  return c
