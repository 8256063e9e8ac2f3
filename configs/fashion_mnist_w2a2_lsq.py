"""Fashion-MNIST W2A2, direct quantization with LSQ (Esser et al., ICLR 2020): learned step
sizes for weights and activations instead of DoReFa's fixed ranges (docs/results.md, "Learned
quantizers (LSQ, PACT)"). Otherwise fashion_mnist_w2a2_direct.py.

  python -m qnet.main --config=configs/fashion_mnist_w2a2_lsq.py --workdir=/tmp/w2a2_lsq
"""

from configs import fashion_mnist_w2a2_direct


def get_config(kind: str = "direct"):
  c = fashion_mnist_w2a2_direct.get_config(kind)
  c.quant.weight_quantizer = "lsq"
  c.quant.act_quantizer = "lsq"
  return c
