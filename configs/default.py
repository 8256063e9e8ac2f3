"""Every field qnet knows, with its default. Other configs import this and override a few.

Run: python -m qnet.main --config=configs/default.py --workdir=/tmp/qnet_default
(the same as configs/fashion_mnist_w4a4.py without its budget; see that file).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Data: fashion_mnist | cifar10 | cifar100 | imagenet2012 (via TFDS; fashion_mnist offline).
  c.dataset = "fashion_mnist"
  c.data_dir = ""  # TFDS data dir; "" means TFDS's default (~/tensorflow_datasets).
  c.augment = True
  c.train_examples = -1  # -1: the whole training split; N: only its first N examples (a fixed subset; epochs count over it).
  c.image_size = 0  # 0: the dataset's native size (224 for imagenet2012).
  # Model: a name from qnet.models.MODELS, or a user's flax.linen class PACKAGE.MODULE:ClassName
  # (built as ClassName(num_classes=N), called as model(x, train=...)), quantized by quant.rules.
  c.model = "fmnist_cnn"
  c.model_act = "quant"  # quant: DoReFa activation quantizer (clip-ReLU at 32 bits); relu: plain FP network (ReLU, unquantized weights, no quantizer op; bits must be 32).
  c.model_width = 1.0  # channel multiplier of the SimpleCNN models (fmnist_cnn, tiny_cnn): a narrower student or a wider teacher.
  c.dtype = "float32"  # float32 | bfloat16 (compute dtype; weights and BN statistics stay float32).
  # Budget. batch_size is global (over all devices and hosts).
  c.batch_size = 128
  c.num_epochs = 5.0
  c.num_train_steps = -1  # -1: derived from num_epochs; 0: only evaluate the starting network (eval_accuracy at step 0).
  c.eval_every_steps = -1  # -1: once per epoch and at the end.
  c.checkpoint_every_steps = 1000
  c.log_every_steps = 100
  c.keep_checkpoints = 3
  c.seed = 0
  # Optimiser: SGD with momentum, decoupled from the lr schedule so phases can restart it.
  c.learning_rate = 0.1
  c.momentum = 0.9
  c.nesterov = False
  c.weight_decay = 1e-4  # on kernels only (not BN scales/biases or dense biases).
  c.lr_schedule = "cosine"  # cosine | step | constant
  c.warmup_steps = 0
  c.lr_step_at = (
    0.5,
    0.75,
  )  # step schedule: fractions of training where lr is multiplied by lr_step_factor.
  c.lr_step_factor = 0.1
  # Quantization (qnet/METHOD.md, "Quantizers"). Bits: 1..16, or 32 for full precision.
  c.quant = ml_collections.ConfigDict()
  c.quant.weight_bits = 4
  c.quant.act_bits = 4
  c.quant.keep_first_last_fp = True
  # Weights: per-output-channel max (DoReFa's normalisation) or step (LSQ); per tensor if False.
  c.quant.per_channel = False
  # The residual stream of the PreActResNet models: 32 float (the paper's networks); 8 int8,
  # one learned step per stage (qnet.models.layers.StreamQuant), so the exported network runs
  # every conv int8-in, int8-out and every sum as an integer add (docs/deploying.md).
  c.quant.residual_bits = 32
  # A user's model (model=PACKAGE.MODULE:ClassName): '' quantizes every nn.Conv / nn.Dense with
  # the quantizers below, the first conv's input never and, with keep_first_last_fp, neither
  # the first conv nor the last dense (qnet.models.rules.default_rules); or PACKAGE.MODULE:NAME,
  # a sequence of qnet.models.Rule (first match wins).
  c.quant.rules = ""
  # Quantizers (docs/results.md, "Learned quantizers (LSQ, PACT)"): weights dorefa | lsq; activations
  # dorefa | pact | lsq. LSQ and PACT learn a clip level per layer (LSQ weights: per channel
  # with per_channel), initialised from the first batch.
  c.quant.weight_quantizer = "dorefa"
  c.quant.act_quantizer = "dorefa"
  c.quant.clip_decay = -1.0  # weight decay on learned clip levels; -1: weight_decay on PACT's alpha (its L2 penalty), 0 on LSQ's.
  # Precision schedule (qnet/METHOD.md remedies 1 and 2). kind: direct | two_stage | progressive |
  # stochastic, or several joined with '+', e.g. 'progressive+two_stage' or 'two_stage+stochastic'.
  c.schedule = ml_collections.ConfigDict()
  c.schedule.kind = "direct"
  c.schedule.phases = ()  # explicit ((start, weight_bits, act_bits), ...); start: float fraction or int step. Overrides kind's phases.
  c.schedule.two_stage_at = 0.5  # two_stage: fraction of each stage spent with FP activations.
  c.schedule.ladder = (
    32,
    8,
    4,
    2,
  )  # progressive: bits ladder down to the target (CVPR: (32, 16, 8, 4, 2)).
  c.schedule.lr_restart = False  # restart the lr schedule at every phase start.
  c.schedule.reset_momentum = False  # zero the momentum buffer at every phase start.
  c.schedule.sp_ratios = (
    0.5,
    0.75,
    0.875,
    1.0,
  )  # stochastic: quantized ratio over equal parts of a phase.
  c.schedule.sp_ramp = (
    "step"  # step: sp_ratios piecewise constant; linear: ramp from sp_ratios[0] to 1.
  )
  c.schedule.sp_unit = "layer"  # layer | block (a residual block, or a layer outside blocks).
  c.schedule.sp_separate = False  # sample weights and activations of a unit separately.
  # Start from another run's latest checkpoint (weights and BN statistics, fresh optimizer), or
  # from a torchvision / timm ResNet state_dict: torchvision:PATH or timm:PATH (.safetensors, or
  # .pth with torch installed) for model tv_resnet18/34/50 (qnet/models/pretrained.py).
  c.init_from = ""
  # Joint knowledge distillation (qnet/METHOD.md remedy 3).
  c.distill = ml_collections.ConfigDict()
  c.distill.enabled = False
  c.distill.temperature = 1.0
  c.distill.student_ce = 0.7
  c.distill.student_kl = 0.7
  c.distill.teacher_ce = 1.0
  c.distill.teacher_kl = 0.5
  c.distill.teacher_model = ""  # "": same architecture as the student.
  c.distill.teacher_width = -1.0  # the teacher's model_width; -1: the student's.
  # clip: the teacher's 32-bit activation is the student's quantizer at 32 bits (DoReFa: clip to
  # [0, 1], the paper's text); relu: a plain ReLU network, the authors' released teacher.
  c.distill.teacher_act = "clip"
  c.distill.kd_warmup = 0.0  # fraction of training with CE only (no KL, no hint), as QKD's first stage.
  c.distill.teacher_learning_rate = -1.0  # -1: same as learning_rate.
  # Frozen teacher: the workdir of a trained run, or torchvision:PATH / timm:PATH (a ResNet
  # state_dict for distill.teacher_model, else model; use distill.teacher_act=relu with it).
  c.distill.teacher_from = ""
  c.distill.hint_weight = 0.0  # beta of the feature-hint L2 term (CVPR version), 0 = off.
  c.distill.extra_students = ()  # more students sharing the teacher: ((weight_bits, act_bits), ...).
  return c
