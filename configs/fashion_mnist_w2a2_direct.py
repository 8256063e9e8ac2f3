"""Fashion-MNIST W2A2, direct quantization (both to 2 bits from step 0): the baseline the
paper's remedies are measured against. Same model and total steps as fashion_mnist_w4a4.py.

  python -m qnet.main --config=configs/fashion_mnist_w2a2_direct.py --workdir=/tmp/w2a2_direct

Variants in this family differ only in `schedule.kind` / `distill` (see the sibling files).
Measured accuracy and time: docs/results.md.
"""

from configs import fashion_mnist_w4a4


def get_config(kind: str = "direct"):
  c = fashion_mnist_w4a4.get_config()
  c.quant.weight_bits = 2
  c.quant.act_bits = 2
  c.schedule.kind = kind
  return c
