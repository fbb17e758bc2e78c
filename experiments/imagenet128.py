"""ImageNet 128x128, the paper's Table 2 setup (Ho & Salimans 2022, section 4.2).

Architecture values are those of ADM's released 128x128 model (openai/guided-diffusion
README, "128x128 model" flags, and script_util's channel_mult for 128); batch and
learning rate from the ADM paper's appendix hyper-parameter table (ImageNet 128).
Input: ImageNet 2012 through TFDS, centre-cropped and resized to 128 as ADM does.
"""

from cfgdiff import configs


def get_config():
  config = configs.default_config()
  config.data.name = "imagenet2012"  # TFDS, read with tfds.data_source
  config.data.path = ""  # TFDS data_dir; "" = TFDS default (~/tensorflow_datasets)
  config.data.image_size = 128
  config.data.channels = 3
  config.data.num_classes = 1000
  config.data.random_flip = True  # ADM and the paper's code flip ImageNet left-right
  # Input worker processes: 64 JPEGs per host step take about 0.23 s of one core here (ADM crop
  # included), against a 0.26 s v4-32 step (BENCHMARKS.md): 8 workers leave 8x headroom.
  config.data.num_workers = 8

  config.model.ch = 256  # ADM 128x128: --num_channels 256
  config.model.ch_mult = (1, 1, 2, 3, 4)  # ADM channel_mult at 128: 128->64->32->16->8
  config.model.num_res_blocks = 2  # ADM 128x128: --num_res_blocks 2
  config.model.attn_resolutions = (32, 16, 8)  # ADM: --attention_resolutions 32,16,8
  config.model.head_channels = 0  # ADM 128x128 uses a fixed head count...
  config.model.num_heads = 4  # ...--num_heads 4
  config.model.dropout = 0.0  # ADM 128x128: no --dropout flag, default 0.0
  config.model.dtype = "bfloat16"  # ADM trains in fp16 (--use_fp16); bf16 on TPU/H100

  # Not stated for Table 2 in the sources above; 0.1 gave the best FID at small w in
  # Table 1 (64x64). Override with --config.diffusion.p_uncond.
  config.diffusion.p_uncond = 0.1
  config.diffusion.logsnr_min = -20.0  # paper section 4: l_min = -20
  config.diffusion.logsnr_max = 20.0  # paper section 4: l_max = 20

  config.train.num_steps = 2_700_000  # paper section 4.2: 2.7M steps at 128x128
  config.train.batch_size = 256  # ADM appendix, ImageNet 128: batch 256
  config.train.learning_rate = 1e-4  # ADM appendix, ImageNet 128: Adam, lr 1e-4
  config.train.warmup_steps = 0  # ADM: no warm-up
  config.train.grad_clip = 1.0  # not in ADM: a guard that leaves normal steps unchanged
  config.train.ema_decay = 0.9999  # ADM: EMA rate 0.9999
  config.train.checkpoint_every_steps = 10_000
  config.train.log_every_steps = 100

  config.sample.sampler = "ancestral"  # paper Algorithm 2
  config.sample.num_steps = 256  # paper Table 2: T in 128 / 256 / 1024
  config.sample.v = 0.2  # paper section 4.2: v = 0.2 at 128x128
  config.sample.batch_size = 512

  # sweep.guidance_weights: the default is the paper's Table 1 grid.
  config.sweep.num_samples = 50_000  # paper: FID/IS on 50k samples
  config.sweep.sampler = "ancestral"
  config.sweep.num_steps = 256
  config.sweep.feature_net = "inception"
  # The published Inception Scores' convention: 10 contiguous splits of 5,000 (each
  # class-balanced, as the classes are drawn in turn).
  config.sweep.score_splits = 10
  # Each FID replicate costs a 2048 x 2048 covariance and eigendecomposition (~1 s).
  config.sweep.bootstrap = 50
  # pytorch-fid's FID Inception with its 1008-way classifier, so the table has FID and IS
  # (ADM's protocol: IS without the output bias); downloaded once, SHA-256 checked.
  config.sweep.inception_weights = "download"

  # Memory: parameters, EMA and Adam moments sharded over the devices of one host (4
  # chips on a v4/v5p host, 8 on a v5e host or an 8-GPU node), the batch over all devices.
  config.runtime.mesh_shape = (-1, 0)
  # The noisy classifier for classifier guidance (--mode=train_classifier): ADM's released
  # 128x128 classifier (openai/guided-diffusion README, "Classifier training" and the
  # 128x128 classifier's CLASSIFIER_FLAGS; script_util.create_classifier).
  config.classifier.ch = 128  # --classifier_width 128
  config.classifier.ch_mult = (1, 1, 2, 3, 4)  # create_classifier's channel_mult at 128x128
  config.classifier.num_res_blocks = 2  # --classifier_depth 2
  config.classifier.attn_resolutions = (32, 16, 8)  # --classifier_attention_resolutions
  config.classifier.head_channels = 64  # create_classifier: num_head_channels=64
  config.classifier.dropout = 0.0  # create_classifier: no dropout
  config.classifier.batch_size = 256  # TRAIN_FLAGS --batch_size 256
  config.classifier.learning_rate = 3e-4  # --lr 3e-4 (AdamW)
  config.classifier.weight_decay = 0.05  # --weight_decay 0.05
  config.classifier.anneal_lr = True  # --anneal_lr True: linear to 0 at the last iteration
  config.classifier.num_steps = 300_000  # --iterations 300000
  config.classifier.warmup_steps = 0  # classifier_train.py: none
  config.classifier.random_crop = True  # load_data(..., random_crop=True)
  config.classifier.random_flip = True  # image_datasets.py: random_flip=True by default
  config.classifier.eval_examples = 10_000  # held-out accuracy by log-SNR when done
  return config
