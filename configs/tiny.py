r"""Tiny unCLIP: every stage in seconds on a CPU; used by the tests.

  python train.py --config configs/tiny.py --workdir runs/tiny

Trains clip -> prior -> decoder -> upsampler for a handful of steps each on a small
captioned_shapes split. It checks that the machinery runs; it does not draw good pictures
(use configs/shapes.py for that).
"""

import ml_collections


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Stages run in this order; each is a config section of that name, whose `task` field
  # says what it trains, and writes into <workdir>/<stage>. A cascade of upsamplers is
  # several sections with task='upsampler' (see configs/dalle2_paper.py).
  c.stages = ('clip', 'prior', 'decoder', 'upsampler')

  c.data = dict(
      name='captioned_shapes',   # a TFDS name, or 'image_folder' (see `folder`)
      data_dir='',               # TFDS data dir; '' = TFDS default (~/tensorflow_datasets)
      folder='',                 # image_folder only: images with same-stem .txt captions
      train_split='train',
      eval_split='test',
      image_key='image',
      caption_key='caption',
      image_size=64,             # default size; a stage may set its own image_size
      worker_count=0,            # grain worker processes (0 = in the main process)
      cache_decoded=False,       # keep decoded records in memory after their first read
      # captioned_shapes generation (ignored by other datasets)
      shapes=dict(seed=0, num_train=512, num_test=128, num_heldout=128),
  )
  c.tokenizer = dict(path='', context_length=32)   # '' = packaged OpenAI CLIP BPE

  c.mesh = dict(data=-1, fsdp=1)   # -1: the rest of the devices
  # Multi-host (train.py flags override): enabled=True with no address = JAX's automatic
  # cluster detection (Cloud TPU, SLURM); or an explicit coordinator 'host:port'.
  c.distributed = dict(enabled=False, coordinator_address='', num_processes=0,
                       process_id=-1)
  c.compilation_cache_dir = ''   # persistent XLA cache ('' = off): restarts skip compiling
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
        optim=dict(lr=lr, warmup_steps=2, schedule='cosine', end_lr_factor=0.1,
                   b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip=1.0,
                   grad_accum=1),
        ema=dict(decay=0.99, warmup_steps=0),
        log_every=1,
        ckpt_every=10,
        keep=2,
        sample_every=0,          # 0 = no sample grids during training
        max_nonfinite=5,         # consecutive non-finite steps before the run stops
    )

  c.clip = stage('clip', steps=4, batch_size=16, lr=1e-3)
  c.clip.image_size = 32
  c.clip.model = dict(
      embed_dim=32,
      text=dict(width=32, depth=1, heads=2, vocab_size=49408, activation='quick_gelu'),
      vision=dict(width=32, depth=1, heads=2, patch_size=8, activation='quick_gelu'),
      logit_scale_init=2.6592,   # log(1/0.07)
      # Optional: text.context_length (default tokenizer.context_length), text.pool
      # ('argmax' = OpenAI, or 'eos' with text.eos_token_id = Hugging Face), mlp_dim
      # (default 4 * width), layer_norm_eps (1e-5), image_mean / image_std (OpenAI's).
  )

  c.prior = stage('prior', steps=4, batch_size=16, lr=1e-3)
  c.prior.clip_checkpoint = ''   # '' = <workdir>/clip of this run
  c.prior.image_size = 32        # = clip.image_size: images only go through the frozen CLIP
  c.prior.model = dict(width=32, depth=1, heads=2, cond_drop_prob=0.1,
                       activation='gelu_tanh',   # MLP activation (layers.ACTIVATIONS)
                       attention_impl='xla',   # 'cudnn': fused, NVIDIA GPUs in bfloat16
                       embed_norm='l2',        # 'l2' (x sqrt(dim)) or 'standardize'
                       stats_examples=4096,    # standardize: training examples for mean/std
                       text_encodings=True)    # False: the pooled text embedding alone
  c.prior.diffusion = dict(schedule='cosine', timesteps=1000, objective='x0',
                           learned_variance=False)
  # sampler: 'ddim' | 'ddpm' | 'dpmpp_2m'; spacing: 'trailing' | 'leading' | 'linspace'
  c.prior.sample = dict(sampler='ddim', steps=8, guidance_scale=1.0, num_candidates=2,
                        spacing='trailing')

  c.decoder = stage('decoder', steps=4, batch_size=8, lr=1e-3)
  c.decoder.clip_checkpoint = ''
  c.decoder.image_size = 32
  c.decoder.model = dict(
      channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(16,),
      head_channels=8, dropout=0.0, num_clip_tokens=4, text_encoder='clip',
      image_embed_drop_prob=0.1, text_drop_prob=0.5, attention_impl='xla',
      custom_conv_grad=False)   # True: hand-written CPU conv gradient (bench/conv_grad.py)
  c.decoder.diffusion = dict(schedule='cosine', timesteps=1000, objective='eps',
                             learned_variance=True, vlb_weight=0.001)
  c.decoder.sample = dict(sampler='ddim', steps=8, guidance_scale=3.0)

  c.upsampler = stage('upsampler', steps=4, batch_size=4, lr=1e-3)
  c.upsampler.low_res = 32      # the image it conditions on (a resized dataset image)
  c.upsampler.high_res = 64     # the image it makes
  c.upsampler.image_size = c.upsampler.get_ref('high_res')   # what the input pipeline loads
  c.upsampler.crop_frac = 0.5   # trains on random crops of this fraction of high_res
  c.upsampler.degradation = 'blur'   # 'blur' (first upsampler) or 'bsr' (second)
  c.upsampler.noise_aug = 0.0        # max noise level of low-res noise augmentation
  c.upsampler.model = dict(channels=16, channel_mult=(1, 2), num_res_blocks=1,
                           attention_resolutions=(), head_channels=8, dropout=0.0,
                           custom_conv_grad=False, image_embed_cond=False)
  c.upsampler.diffusion = dict(schedule='cosine', timesteps=1000, objective='eps',
                               learned_variance=False)
  c.upsampler.sample = dict(sampler='ddim', steps=4)
  c.lock()
  return c
