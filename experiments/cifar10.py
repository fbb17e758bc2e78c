"""CIFAR-10 32x32, 10 classes: natural colour images in about an hour on one GPU.

Between Fashion-MNIST on a CPU and ImageNet on a pod: the method on colour photographs at
a size one GPU trains in an afternoon's first hour. The U-Net is DDPM's CIFAR-10 network
(Ho et al. 2020, appendix B: 128 channels, multipliers 1, 2, 2, 2, two residual blocks
per level, attention at 16x16, dropout 0.1) with ADM's multi-head attention; DDPM trained
it 800k steps at batch 128, this run 60k, enough for the guidance trade-off to show.

Time: an ESTIMATE until measured on a GPU, from XLA's FLOP count (`python -m
benchmarks.compute_plan --runs=cifar10`): 60k steps x 128 images x 3 forward passes of
the model's GFLOPs per image, at 40% of an H100's bf16 peak, is about an hour; an A100
takes about 3x as long. `python -m benchmarks.accelerator_check --config=experiments/
cifar10.py --per_chip_batch=128` measures the step and prints the projection.

Data: TFDS `cifar10` prepared as ArrayRecord (README, "Your own data"); FID and IS use the
FID Inception on the training split (reference) and the test split (floor).
"""

from cfgdiff import configs


def get_config():
  config = configs.default_config()
  config.data.name = "cifar10"  # TFDS, read with tfds.data_source
  config.data.path = ""  # TFDS data_dir; "" = TFDS default (~/tensorflow_datasets)
  config.data.image_size = 32
  config.data.channels = 3
  config.data.num_classes = 10
  config.data.random_flip = True  # DDPM: random horizontal flips on CIFAR-10
  config.data.num_workers = 4

  config.model.ch = 128  # DDPM CIFAR-10: ch 128
  config.model.ch_mult = (1, 2, 2, 2)  # DDPM CIFAR-10: 32 -> 16 -> 8 -> 4
  config.model.num_res_blocks = 2  # DDPM CIFAR-10: 2 residual blocks per level
  config.model.attn_resolutions = (16,)  # DDPM CIFAR-10: self-attention at 16x16
  config.model.head_channels = 64  # ADM's multi-head attention (DDPM: one head)
  config.model.dropout = 0.1  # DDPM CIFAR-10: dropout 0.1
  config.model.dtype = "bfloat16"

  config.diffusion.p_uncond = 0.2  # the paper's Table 1 middle column

  config.train.num_steps = 60_000  # about an hour on one H100 (estimate, see above)
  config.train.batch_size = 128  # DDPM CIFAR-10: batch 128
  config.train.learning_rate = 2e-4  # DDPM CIFAR-10: Adam, lr 2e-4
  config.train.warmup_steps = 5000  # DDPM CIFAR-10: 5000 warm-up steps
  config.train.grad_clip = 1.0  # DDPM: gradient norm clipped to 1
  config.train.ema_decay = 0.9995  # DDPM uses 0.9999 over 800k steps; 60k need a shorter average
  config.train.checkpoint_every_steps = 5000
  config.train.log_every_steps = 500

  config.sample.sampler = "ancestral"  # paper Algorithm 2
  config.sample.num_steps = 256
  config.sample.v = 0.3  # paper section 4.1
  config.sample.batch_size = 500

  # FID/IS on 10k samples per cell (50k is the published protocol, 5x the time), over
  # the paper's Table 1 grid's lower half, where the trade-off turns.
  config.sweep.guidance_weights = (0.0, 0.1, 0.3, 0.5, 1.0, 2.0, 4.0)
  config.sweep.num_samples = 10_000
  config.sweep.sampler = "ancestral"
  config.sweep.num_steps = 256
  config.sweep.feature_net = "inception"
  config.sweep.score_splits = 10
  config.sweep.bootstrap = 50
  config.sweep.inception_weights = "download"
  return config
