r"""COCO captions at 64 px: the real-data recipe (clip -> prior -> decoder -> upsampler 256).

  tfds build coco_captions --data_dir=$TFDS_DIR --file_format=array_record   # once
  python train.py --config configs/coco64.py --workdir runs/coco64 \
      --config.data.data_dir=$TFDS_DIR

Nothing is downloaded at run time: prepare coco_captions (array_record) in the TFDS data dir
first. Each COCO image has five captions; the input pipeline picks one at random per epoch
(deterministically from the seed). Sized for accelerators (GPU/TPU); on a CPU use
configs/tiny.py or configs/shapes.py.
"""

import ml_collections


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Stages run in this order; each is a config section of that name, whose `task` field
  # says what it trains, and writes into <workdir>/<stage>.
  c.stages = ('clip', 'prior', 'decoder', 'upsampler')

  c.data = dict(
      name='coco_captions',      # a TFDS name, or 'image_folder' (see `folder`)
      data_dir='',               # TFDS data dir; '' = TFDS default (~/tensorflow_datasets)
      folder='',                 # image_folder only: images with same-stem .txt captions
      train_split='train+restval',
      eval_split='val',
      image_key='image',
      caption_key='captions/text',   # five captions per image: one is picked per example
      image_size=64,             # default size; a stage may set its own image_size
      worker_count=8,            # grain worker processes (0 = in the main process)
      cache_decoded=False,       # keep decoded records in memory (per worker process)
      # captioned_shapes generation (ignored by other datasets)
      shapes=dict(seed=0, num_train=512, num_test=128, num_heldout=128),
  )
  c.tokenizer = dict(path='', context_length=77)   # '' = packaged OpenAI CLIP BPE

  c.mesh = dict(data=-1, fsdp=1)   # -1: the rest of the devices
  # Logical axis name -> mesh axes. Data parallel: fsdp=1; FSDP: set mesh.fsdp > 1.
  c.axis_rules = (
      ('batch', ('data', 'fsdp')),
      ('embed', 'fsdp'),
      ('conv_out', 'fsdp'),
      ('mlp', None),
      ('heads', None),
      ('kv', None),
      ('vocab', None),
      ('conv_in', None),
      ('length', None),
  )

  def stage(task, steps, batch_size, lr):
    return dict(
        task=task,
        steps=steps,
        batch_size=batch_size,   # global batch
        dtype='float32',         # compute dtype; params and optimizer state stay float32
        remat=False,
        optim=dict(lr=lr, warmup_steps=2000, schedule='cosine', end_lr_factor=0.1,
                   b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, grad_clip=1.0,
                   grad_accum=1),
        ema=dict(decay=0.9999, warmup_steps=1000),
        log_every=100,
        ckpt_every=5000,
        keep=3,
        sample_every=10000,          # 0 = no sample grids during training
        max_nonfinite=5,         # consecutive non-finite steps before the run stops
    )

  c.clip = stage('clip', steps=100_000, batch_size=1024, lr=5e-4)
  c.clip.dtype = 'bfloat16'
  c.clip.image_size = 64
  c.clip.model = dict(
      embed_dim=512,
      text=dict(width=512, depth=12, heads=8, vocab_size=49408, activation='quick_gelu'),
      vision=dict(width=768, depth=12, heads=12, patch_size=8, activation='quick_gelu'),
      logit_scale_init=2.6592,   # log(1/0.07)
  )

  c.prior = stage('prior', steps=200_000, batch_size=512, lr=1.1e-4)
  c.prior.dtype = 'bfloat16'
  c.prior.clip_checkpoint = ''   # '' = <workdir>/clip of this run
  c.prior.model = dict(width=1024, depth=16, heads=16, cond_drop_prob=0.1,
                       activation='gelu_tanh',   # MLP activation (layers.ACTIVATIONS)
                       attention_impl='xla',   # 'cudnn': fused flash attention, NVIDIA GPUs
                       embed_norm='l2',   # 'l2' (x sqrt(dim)) or 'standardize'
                       text_encodings=True)   # the caption's tokens too (the paper's)
  c.prior.diffusion = dict(schedule='cosine', timesteps=1000, objective='x0',
                           learned_variance=False)
  c.prior.sample = dict(sampler='ddim', steps=64, guidance_scale=1.0, num_candidates=2)

  c.decoder = stage('decoder', steps=300_000, batch_size=256, lr=1.2e-4)
  c.decoder.dtype = 'bfloat16'
  c.decoder.clip_checkpoint = ''
  c.decoder.image_size = 64
  c.decoder.model = dict(
      channels=192, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
      attention_resolutions=(32, 16, 8), head_channels=64, dropout=0.1, num_clip_tokens=4,
      text_encoder='clip',
      image_embed_drop_prob=0.1, text_drop_prob=0.5, custom_conv_grad=True,
      attention_impl='xla')   # 'cudnn' on NVIDIA GPUs: 32 px attention without the logits
  c.decoder.diffusion = dict(schedule='cosine', timesteps=1000, objective='eps',
                             learned_variance=True, vlb_weight=0.001)
  c.decoder.sample = dict(sampler='ddim', steps=100, guidance_scale=3.0)

  c.upsampler = stage('upsampler', steps=200_000, batch_size=128, lr=1.2e-4)
  c.upsampler.dtype = 'bfloat16'
  c.upsampler.low_res = 64      # the image it conditions on (a resized dataset image)
  c.upsampler.high_res = 256    # the image it makes
  c.upsampler.crop_frac = 0.25  # trains on random crops of this fraction of high_res
  c.upsampler.degradation = 'blur'   # 'blur' (first upsampler) or 'bsr' (second)
  c.upsampler.noise_aug = 0.2        # max noise level of low-res noise augmentation
  c.upsampler.model = dict(channels=128, channel_mult=(1, 2, 3, 4), num_res_blocks=2,
                           attention_resolutions=(), head_channels=64, dropout=0.0,
                           custom_conv_grad=True, image_embed_cond=False)
  c.upsampler.diffusion = dict(schedule='cosine', timesteps=1000, objective='eps',
                               learned_variance=False)
  c.upsampler.sample = dict(sampler='ddim', steps=50)
  c.lock()
  return c
