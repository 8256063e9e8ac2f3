"""The paper's recipes for GPU / TPU users, one variant per setting (big_vision style):

  python -m qnet.main --config=configs/paper_recipes.py:cifar100_resnet20_kd --workdir=DIR
  python -m qnet.main --config=configs/paper_recipes.py:imagenet_resnet18_w4a4_kd \
      --config.init_from=torchvision:resnet18.safetensors --workdir=DIR

Variants (settings: qnet/METHOD.md, "Settings the authors released"; multi-host: QNET_DISTRIBUTED=1):
  cifar100_resnet20_kd       pre-activation ResNet-20 teacher (plain ReLU) + students W2A2 and W4A4
                             sharing it; T=1, student CE 0.7 / KL 0.7, teacher CE 1.0 / KL 0.5; 200
                             epochs, batch 128, SGD 0.9 Nesterov, wd 1e-4, lr 0.1 (both) / 10 at
                             epochs 80, 120.
  cifar100_resnet20_w{2,4}   the released baseline without distillation: lr / 10 at 60, 120.
  cifar100_resnet20_w2_pq_kd progressive 32 -> 8 -> 4 -> 2 plus the joint teacher.
  imagenet_resnet18_w4a4_kd  both networks start from torchvision's pretrained ResNet-18, as the
                             authors' code does (`tv_resnet18`, --config.init_from=torchvision:PATH,
                             which loads the teacher too), fine-tuned 30 epochs, batch 256,
                             lr 0.001 (teacher) / 0.005 (student), / 10 at 15 and 25, wd 1e-4.
                             PATH: a state_dict saved from torchvision, e.g. in a torch venv
                             `m = torchvision.models.resnet18(weights="IMAGENET1K_V1")` then
                             `safetensors.torch.save_file(m.state_dict(), "resnet18.safetensors")`
                             (or `torch.save(m.state_dict(), "resnet18.pth")`: needs torch here).
  imagenet_resnet18_w2a2_kd  the same at W2A2.
  imagenet_resnet50_w{4,2}   ResNet-50 from scratch, 90 epochs, batch 256, cosine, bf16 compute.
  imagenet_alexnet_w{4,2}    AlexNet with BN, from scratch, 90 epochs, batch 256.
Targets: qnet/METHOD.md, "What the paper reports"; compare with an FP run of the same
variant (`--config.quant.weight_bits=32 --config.quant.act_bits=32`). Steps: CIFAR-100 ~78k,
ImageNet 90 epochs ~450k; measured step speed: docs/results.md.
"""

from configs import default

_IMAGENET_TRAIN = 1_281_167

VARIANTS = (
  "cifar100_resnet20_kd",
  "cifar100_resnet20_w2",
  "cifar100_resnet20_w4",
  "cifar100_resnet20_w2_pq_kd",
  "imagenet_resnet18_w4a4_kd",
  "imagenet_resnet18_w2a2_kd",
  "imagenet_resnet50_w4",
  "imagenet_resnet50_w2",
  "imagenet_alexnet_w4",
  "imagenet_alexnet_w2",
)


def _cifar100(bits: int, distill: bool):
  c = default.get_config()
  c.dataset, c.model = "cifar100", "resnet20"
  c.batch_size, c.num_epochs = 128, 200.0
  c.learning_rate, c.momentum, c.weight_decay = 0.1, 0.9, 1e-4
  c.lr_schedule = "step"
  c.lr_step_at = (80 / 200, 120 / 200) if distill else (60 / 200, 120 / 200)
  c.quant.weight_bits = c.quant.act_bits = bits
  c.eval_every_steps = c.checkpoint_every_steps = 1950
  if distill:
    c.distill.enabled = True
    c.distill.temperature = 1.0
    c.distill.student_ce, c.distill.student_kl = 0.7, 0.7
    c.distill.teacher_ce, c.distill.teacher_kl = 1.0, 0.5
    c.distill.teacher_act = "relu"  # the released mutual_kl code keeps the teacher's ReLU
    c.nesterov = True  # as that code's SGD
  return c


def _imagenet(model: str, bits: int, epochs: float, lr: float):
  c = default.get_config()
  c.dataset, c.model, c.image_size = "imagenet2012", model, 224
  c.batch_size, c.num_epochs = 256, epochs
  c.learning_rate, c.weight_decay = lr, 1e-4
  c.quant.weight_bits = c.quant.act_bits = bits
  c.dtype = "bfloat16"
  c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 500, 5000, 5000
  return c


def get_config(variant: str = "cifar100_resnet20_kd"):
  if variant == "cifar100_resnet20_kd":
    c = _cifar100(2, distill=True)
    c.distill.extra_students = ((4, 4),)
  elif variant in ("cifar100_resnet20_w2", "cifar100_resnet20_w4"):
    c = _cifar100(int(variant[-1]), distill=False)
  elif variant == "cifar100_resnet20_w2_pq_kd":
    c = _cifar100(2, distill=True)
    c.schedule.kind = "progressive"
  elif variant in ("imagenet_resnet18_w4a4_kd", "imagenet_resnet18_w2a2_kd"):
    # torchvision's layout, so its pretrained weights load (qnet.models.pretrained).
    c = _imagenet("tv_resnet18", 4 if "w4a4" in variant else 2, 30.0, 0.005)
    c.lr_schedule, c.lr_step_at = "step", (15 / 30, 25 / 30)
    c.distill.enabled = True
    c.distill.teacher_learning_rate = 0.001
    c.distill.teacher_act = "relu"  # the released code's teacher, and the pretrained net's function
  elif variant in ("imagenet_resnet50_w4", "imagenet_resnet50_w2"):
    c = _imagenet("resnet50", int(variant[-1]), 90.0, 0.1)
    c.warmup_steps = 5 * _IMAGENET_TRAIN // c.batch_size
  elif variant in ("imagenet_alexnet_w4", "imagenet_alexnet_w2"):
    c = _imagenet("alexnet_bn", int(variant[-1]), 90.0, 0.02)
    c.warmup_steps = _IMAGENET_TRAIN // c.batch_size
  else:
    raise ValueError(
      f"configs/paper_recipes.py:{variant}: unknown variant; allowed: {', '.join(VARIANTS)}"
    )
  return c
