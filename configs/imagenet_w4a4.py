"""ImageNet, ResNet-50 at W4A4 (GPU or TPU pod).

  python -m qnet.main --config=configs/imagenet_w4a4.py --workdir=gs://BUCKET/imagenet_w4a4

Needs TFDS's `imagenet2012` prepared (manual download, then `tfds build imagenet2012`).
Recipe: the paper's ImageNet setting scaled to ResNet-50 trained from scratch here: 90 epochs,
global batch 256 (lr 0.1, scale linearly with batch), SGD momentum 0.9, weight decay 1e-4,
cosine decay with 5 warm-up epochs, inception crop + flip, first and last layers FP.
Multi-host: set QNET_DISTRIBUTED=1 so main.py calls jax.distributed.initialize().
Target: the paper reports W4A4 ResNet-50 matching full precision (~75-76% top-1).
Time: ~450k steps at batch 256; one 8-GPU node roughly a few days.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.dataset = "imagenet2012"
  c.model = "resnet50"
  c.image_size = 224
  c.batch_size = 256
  c.num_epochs = 90.0
  c.learning_rate = 0.1 * c.batch_size / 256
  c.weight_decay = 1e-4
  c.lr_schedule = "cosine"
  c.warmup_steps = 5 * 1281167 // c.batch_size
  c.quant.weight_bits = 4
  c.quant.act_bits = 4
  c.dtype = "bfloat16"
  c.log_every_steps = 500
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 5000
  return c
