"""Fashion-MNIST W2A2 student trained jointly with a full-precision teacher (qnet/METHOD.md
remedy 3, the released CIFAR-100 weights: T=1, student CE 0.7 + KL 0.7, teacher CE 1.0 +
KL 0.5; the teacher's activations are the clip to [0, 1]).

  python -m qnet.main --config=configs/fashion_mnist_w2a2_distill.py --workdir=/tmp/w2a2_kd

Same model (for both networks) and total steps as fashion_mnist_w4a4.py; a step costs about
two plain steps. `eval_accuracy` is the student's; `teacher_eval_accuracy` the teacher's.
Measured accuracy and time: docs/results.md.
"""

from configs import fashion_mnist_w2a2_direct


def get_config(kind: str = "direct"):
  c = fashion_mnist_w2a2_direct.get_config(kind)
  c.distill.enabled = True
  return c
