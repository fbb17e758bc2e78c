"""A tiny config for tests: 8x8 images, a 2-level U-Net with 8 base channels."""

from cfgdiff import configs


def get_config():
  config = configs.default_config()
  config.data.image_size = 8
  config.data.num_classes = 4
  config.model.ch = 8
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (4,)
  config.model.head_channels = 8
  config.model.dropout = 0.1  # exercised on purpose: dropout RNG must not depend on devices
  config.train.num_steps = 6
  config.train.batch_size = 8
  config.train.learning_rate = 3e-3
  config.train.warmup_steps = 2
  config.train.ema_decay = 0.9
  config.train.checkpoint_every_steps = 3
  config.train.log_every_steps = 2
  # Fixed, so that runs compared bit for bit make the same choice ("auto" times the
  # step both ways, and a tiny step times within noise of itself): "auto" has its own tests.
  config.train.kernel_gradient = "taps"
  config.runtime.cpu_devices = 1
  return config
