"""ImageNet 64x64, the paper's Table 1 setup (Ho & Salimans 2022, section 4).

The paper uses the ADM architecture and hyper-parameters "apart from continuous time".
ADM values are from Dhariwal & Nichol 2021, Table 10 / appendix, ImageNet 64 model.
"""

from cfgdiff import configs


def get_config():
  config = configs.default_config()
  config.data.name = "imagenet_resized/64x64"  # TFDS; input pipeline not in this version yet
  config.data.image_size = 64
  config.data.channels = 3
  config.data.num_classes = 1000

  config.model.ch = 192  # ADM: 192 base channels at 64x64
  config.model.ch_mult = (1, 2, 3, 4)  # ADM: 64 -> 32 -> 16 -> 8
  config.model.num_res_blocks = 3  # ADM: 3 residual blocks per resolution
  config.model.attn_resolutions = (32, 16, 8)  # ADM: attention at 32, 16 and 8
  config.model.head_channels = 64  # ADM: 64 channels per attention head
  config.model.dropout = 0.1  # ADM ImageNet 64: dropout 0.1

  config.diffusion.p_uncond = 0.1  # paper: 0.1 / 0.2 / 0.5 swept (Table 1)
  config.diffusion.logsnr_min = -20.0  # paper section 2: l in [-20, 20]
  config.diffusion.logsnr_max = 20.0

  config.train.num_steps = 400_000  # paper: 400k steps at 64x64
  config.train.batch_size = 2048  # ADM ImageNet 64: batch 2048
  config.train.learning_rate = 3e-4  # ADM ImageNet 64: Adam lr 3e-4
  config.train.warmup_steps = 0  # ADM uses no warm-up; kept 0 to match
  config.train.grad_clip = 1.0  # not in ADM; a guard that leaves normal steps unchanged
  config.train.ema_decay = 0.9999  # ADM: EMA 0.9999
  config.train.checkpoint_every_steps = 5000
  config.train.log_every_steps = 100
  return config
