"""Fashion-MNIST W2A2 where direct quantization costs several points ("hard" family): every
layer quantized, the first conv's kernel and the classifier too (`keep_first_last_fp=False`);
otherwise the model, budget and recipe of fashion_mnist_w2a2_direct.py.

  python -m qnet.main --config=configs/fashion_mnist_hard_w2a2_direct.py --workdir=/tmp/hard_direct

Chosen by experiments/pilot.py (experiments/results/fashion_mnist_pilot.md); the siblings
fashion_mnist_hard_*.py are the same setting per method, as experiments/sweep.py
--family fashion_mnist_hard runs them. Measured: experiments/results/fashion_mnist_hard.md.
"""

from configs import fashion_mnist_w2a2_direct


def harden(c):
  """The hard setting's changes to a fashion_mnist_* config (the one place they live)."""
  c.quant.keep_first_last_fp = False
  return c


def get_config(kind: str = "direct"):
  return harden(fashion_mnist_w2a2_direct.get_config(kind))
