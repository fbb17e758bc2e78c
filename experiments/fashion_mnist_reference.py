"""The shipped Fashion-MNIST reference model: the CPU default, trained 3.3x longer.

Same network, schedule and p_uncond as `fashion_mnist.py` (so its checkpoint restores
into that config), trained on 128,000 images (about 2.1 epochs) instead of 38,400.
Batch 32 instead of 16: past the first few thousand steps the larger batch gives smoother
gradients for the same images. The EMA averages over ~1,000 steps (32,000 images); the
EMA starts from the initial parameters without a warm-up, so its decay must leave them a
small weight at the end (0.999^4000 = 1.8%; 0.9995 would leave 14%). A longer run is the
same command with a larger train.num_steps: it resumes from the last checkpoint.
`make reference` runs it; the run resumes from its latest checkpoint when restarted, so
it may span several sessions.
"""

from experiments import fashion_mnist


def get_config():
  config = fashion_mnist.get_config()
  config.train.num_steps = 4000
  config.train.batch_size = 32
  config.train.ema_decay = 0.999
  config.train.checkpoint_every_steps = 500
  config.train.keep_checkpoints = 2
  config.train.log_every_steps = 250
  return config
