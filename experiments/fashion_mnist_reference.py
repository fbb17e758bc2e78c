"""The shipped Fashion-MNIST reference model: the CPU default, trained about 12x longer.

Same network, schedule and p_uncond as `fashion_mnist.py` (so its checkpoint restores
into that config), trained on 192,000 images (about 3.2 epochs) instead of 38,400.
Batch 32 instead of 16: past the first few thousand steps the larger batch gives smoother
gradients for the same images. The EMA averages over ~1,000 steps (32,000 images); the
EMA starts from the initial parameters without a warm-up, so its decay must leave them a
negligible weight at the end (0.999^6000 = 0.25%; 0.9995 would leave 5%).
`make reference` runs it; the run resumes from its latest checkpoint when restarted, so
it may span several sessions.
"""

from experiments import fashion_mnist


def get_config():
  config = fashion_mnist.get_config()
  config.train.num_steps = 6000
  config.train.batch_size = 32
  config.train.ema_decay = 0.999
  config.train.checkpoint_every_steps = 500
  config.train.keep_checkpoints = 2
  config.train.log_every_steps = 250
  return config
