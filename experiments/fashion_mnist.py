"""Fashion-MNIST 28x28, the CPU-scale default (see README for its measured run time)."""

from cfgdiff import configs


def get_config():
  config = configs.default_config()
  config.train.num_steps = 1000
  return config
