"""Where joint distillation can help: the settings of `experiments/sweep.py --name
fashion_mnist_kd --family fashion_mnist_kd`, one variant each (big_vision style):

  python -m qnet.main --config=configs/fashion_mnist_kd.py:fp_student_ce --workdir=DIR

Stage 1, the implementation check at full precision (Hinton-style KD helps reliably here): a
narrow plain-ReLU fmnist_cnn (width 0.25) on a 2,000-image training subset for 100 epochs
(1,500 steps of 128, no augmentation), with CE only or distilled at T = 1 / T = 4 from a
frozen, wider plain-ReLU teacher (width 2, trained by `fp_teacher` on the same subset and
budget; the sweep passes its workdir as `distill.teacher_from`, same seed):
  fp_teacher, fp_student_ce, fp_student_kd_t1, fp_student_kd_t4
Stage 3, the authors' released protocol transposed (W2A2 with the first and last layers FP,
a plain-ReLU joint teacher, augmentation on, 9 epochs = 3x the default budget):
  w2a2_ce, w2a2_kd_t1, w2a2_kd_t4, w2a2_progressive, w2a2_progressive_kd_t1,
  w2a2_progressive_kd_t4
Stage 4, a frozen, pretrained and wider teacher at W2A2: a plain-ReLU fmnist_cnn of width 2
trained beforehand on the default FP budget (`w2a2_wide_teacher`: 3 epochs of the full training
set), then frozen (`distill.teacher_from`, same seed) while the stage-3 W2A2 student learns from
it at T = 4:
  w2a2_wide_teacher, w2a2_frozen_wide_kd_t4
`BASELINES` names the run each variant is compared with (same seeds, Welch's t-test).
Measured: docs/results.md, "Distillation".
"""

from configs import fashion_mnist_fp_relu, fashion_mnist_w2a2_direct

VARIANTS = (
  "fp_teacher",
  "fp_student_ce",
  "fp_student_kd_t1",
  "fp_student_kd_t4",
  "w2a2_ce",
  "w2a2_kd_t1",
  "w2a2_kd_t4",
  "w2a2_progressive",
  "w2a2_progressive_kd_t1",
  "w2a2_progressive_kd_t4",
  "w2a2_wide_teacher",
  "w2a2_frozen_wide_kd_t4",
)
# Variant -> the variant whose trained network (same seed) is its frozen teacher.
TEACHERS = {
  "fp_student_kd_t1": "fp_teacher",
  "fp_student_kd_t4": "fp_teacher",
  "w2a2_frozen_wide_kd_t4": "w2a2_wide_teacher",
}
# Variant -> the variant it is compared with.
BASELINES = {
  "fp_student_kd_t1": "fp_student_ce",
  "fp_student_kd_t4": "fp_student_ce",
  "w2a2_kd_t1": "w2a2_ce",
  "w2a2_kd_t4": "w2a2_ce",
  "w2a2_progressive": "w2a2_ce",
  "w2a2_progressive_kd_t1": "w2a2_progressive",
  "w2a2_progressive_kd_t4": "w2a2_progressive",
  "w2a2_frozen_wide_kd_t4": "w2a2_ce",
}
_SUBSET, _SUBSET_EPOCHS = 2000, 100.0
TEACHER_WIDTH, STUDENT_WIDTH = 2.0, 0.25


def _fp_subset(width: float):
  c = fashion_mnist_fp_relu.get_config()
  c.train_examples, c.num_epochs, c.model_width = _SUBSET, _SUBSET_EPOCHS, width
  c.eval_every_steps = c.checkpoint_every_steps = 500
  return c


def _w2a2(kind: str):
  c = fashion_mnist_w2a2_direct.get_config(kind)
  c.augment = True
  c.num_epochs = 9.0
  c.eval_every_steps = 1404
  return c


def _distilled(c, temperature: float):
  c.distill.enabled = True
  c.distill.temperature = temperature
  c.distill.teacher_act = "relu"  # the released code's teacher
  return c


def get_config(variant: str = "fp_student_ce"):
  if variant not in VARIANTS:
    raise ValueError(
      f"configs/fashion_mnist_kd.py:{variant}: unknown variant; allowed: {', '.join(VARIANTS)}"
    )
  t = 4.0 if variant.endswith("_t4") else 1.0
  if variant == "fp_teacher":
    return _fp_subset(TEACHER_WIDTH)
  if variant.startswith("fp_student"):
    c = _fp_subset(STUDENT_WIDTH)
    if variant != "fp_student_ce":
      _distilled(c, t)
      c.distill.teacher_width = TEACHER_WIDTH  # frozen: `teacher_from` gives its weights
    return c
  if variant == "w2a2_wide_teacher":
    c = fashion_mnist_fp_relu.get_config()
    c.model_width = TEACHER_WIDTH
    return c
  c = _w2a2("progressive" if "progressive" in variant else "direct")
  if variant == "w2a2_frozen_wide_kd_t4":
    c = _distilled(c, t)
    c.distill.teacher_width = TEACHER_WIDTH  # frozen: `teacher_from` gives its weights
    return c
  return _distilled(c, t) if "_kd_" in variant else c
