r"""DALL-E 2 (unCLIP) at the paper's sizes: CLIP ViT-H/16, 1B prior, 3.5B decoder, 700M + 300M
upsamplers (Ramesh et al. 2022, Table 3 and App. C).

  python train.py --config configs/dalle2_paper.py --workdir gs://BUCKET/dalle2 \
      --config.data.folder=/data/laion --config.mesh.fsdp=16

For a TPU pod or a large GPU cluster, not a workstation: it documents the paper's recipe and
is instantiated abstractly in the tests (tests/test_paper_config.py checks every stage's
parameter count against the paper's within 10%, with `jax.eval_shape`, no memory). The
paper's data (~650M image-text pairs) is not public: point `data` at an image folder or a
TFDS dataset of your own. Stages train bfloat16 with rematerialisation and FSDP-sharded
params (mesh.fsdp); each writes <workdir>/<stage>.

Sizes:
  clip             ViT-H/16 at 256 px (width 1280, 32 blocks), text width 1024, 24 blocks
  prior            causal transformer width 2048, 24 layers (MLP 3x width gives the paper's
                   1B; 4x would be 1.2B)
  decoder          ADM UNet 512 ch, mult 1,2,3,4, 3 res blocks, attention at 32/16/8 px,
                   head channels 64, plus its own GLIDE text transformer (width 2048, 24
                   layers, ~1.2B): 3.5B in all
  upsampler_256    64 -> 256: 320 ch, mult 1,2,3,4, 3 res blocks, no attention, blur: ~700M
  upsampler_1024   256 -> 1024: 192 ch, mult 1,1,2,2,4,4, 2 res blocks, BSR: ~300M
"""

import ml_collections


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stages = ('clip', 'prior', 'decoder', 'upsampler_256', 'upsampler_1024')

  c.data = dict(
      name='image_folder',       # a TFDS name, or 'image_folder' (see `folder`)
      data_dir='',               # TFDS data dir; '' = TFDS default (~/tensorflow_datasets)
      folder='',                 # image_folder only: images with same-stem .txt captions
      train_split='train',
      eval_split='train[:10000]',
      image_key='image',
      caption_key='caption',
      image_size=256,            # default size; a stage may set its own image_size
      worker_count=16,           # grain worker processes (0 = in the main process)
      cache_decoded=False,       # keep decoded records in memory (per worker process)
      shapes=dict(seed=0, num_train=512, num_test=128, num_heldout=128),
  )
  c.tokenizer = dict(path='', context_length=77)   # '' = packaged OpenAI CLIP BPE

  c.mesh = dict(data=-1, fsdp=8)   # -1: the rest of the devices
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

  def stage(task, steps, batch_size, lr, wd=0.0, b2=0.999):
    return dict(
        task=task,
        steps=steps,
        batch_size=batch_size,   # global batch
        dtype='bfloat16',        # compute dtype; params and optimizer state stay float32
        remat=True,
        optim=dict(lr=lr, warmup_steps=10_000, schedule='cosine', end_lr_factor=0.1,
                   b1=0.9, b2=b2, eps=1e-8, weight_decay=wd, grad_clip=1.0,
                   grad_accum=1),
        ema=dict(decay=0.9999, warmup_steps=10_000),
        log_every=100,
        ckpt_every=5000,
        keep=3,
        sample_every=20_000,
        max_nonfinite=5,
    )

  # CLIP ViT-H/16 (the paper trains its own on ~650M images).
  c.clip = stage('clip', steps=500_000, batch_size=32_768, lr=5e-4, wd=0.2, b2=0.98)
  c.clip.image_size = 256
  c.clip.model = dict(
      embed_dim=1024,
      text=dict(width=1024, depth=24, heads=16, vocab_size=49408, activation='gelu'),
      vision=dict(width=1280, depth=32, heads=16, patch_size=16, activation='gelu'),
      logit_scale_init=2.6592,
  )

  # Diffusion prior: batch 4096, 600K iters, lr 1.1e-4, wd 6e-2, AdamW b2 0.96, EMA 0.9999.
  c.prior = stage('prior', steps=600_000, batch_size=4096, lr=1.1e-4, wd=6e-2, b2=0.96)
  c.prior.clip_checkpoint = ''   # '' = <workdir>/clip/export of this run
  c.prior.model = dict(width=2048, depth=24, heads=32, mlp_dim=6144, cond_drop_prob=0.1,
                       activation='gelu_tanh',   # MLP activation (layers.ACTIVATIONS)
                       attention_impl='xla',   # 'cudnn': fused flash attention, NVIDIA GPUs
                       embed_norm='l2',
                       text_encodings=True)   # the caption's token encodings too (Sec. 2.1)
  c.prior.diffusion = dict(schedule='cosine', timesteps=1000, objective='x0',
                           learned_variance=False)
  c.prior.sample = dict(sampler='ddim', steps=64, spacing='linspace', guidance_scale=1.0,
                        num_candidates=2)

  # Decoder 64 px: batch 2048, 800K iters, lr 1.2e-4; hybrid loss; 250 strided steps.
  c.decoder = stage('decoder', steps=800_000, batch_size=2048, lr=1.2e-4)
  c.decoder.clip_checkpoint = ''
  c.decoder.image_size = 64
  c.decoder.model = dict(
      channels=512, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
      attention_resolutions=(32, 16, 8), head_channels=64, dropout=0.1, num_clip_tokens=4,
      text_encoder='own',   # GLIDE's text transformer, trained with the decoder
      text=dict(width=2048, depth=24, heads=32, vocab_size=49408),
      image_embed_drop_prob=0.1, text_drop_prob=0.5, custom_conv_grad=False,
      attention_impl='xla')   # 'cudnn' on NVIDIA GPUs: 32 px attention without the logits
  c.decoder.diffusion = dict(schedule='cosine', timesteps=1000, objective='eps',
                             learned_variance=True, vlb_weight=0.001)
  c.decoder.sample = dict(sampler='ddpm', steps=250, spacing='linspace', guidance_scale=1.25)

  # Upsampler 64 -> 256: batch 1024, 1M iters, blur, crops of 1/4 size; 27 DDIM steps.
  c.upsampler_256 = stage('upsampler', steps=1_000_000, batch_size=1024, lr=1.2e-4)
  c.upsampler_256.low_res = 64
  c.upsampler_256.high_res = 256
  c.upsampler_256.image_size = c.upsampler_256.get_ref('high_res')
  c.upsampler_256.crop_frac = 0.25
  c.upsampler_256.degradation = 'blur'
  c.upsampler_256.noise_aug = 0.0
  c.upsampler_256.model = dict(channels=320, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                               attention_resolutions=(), head_channels=64, dropout=0.0,
                               custom_conv_grad=False,
                               image_embed_cond=False)   # the paper's see no embedding
  c.upsampler_256.diffusion = dict(schedule='cosine', timesteps=1000, objective='eps',
                                   learned_variance=False)
  c.upsampler_256.sample = dict(sampler='ddim', steps=27, noise_level=0.0)

  # Upsampler 256 -> 1024: batch 512, 1M iters, BSR, linear schedule; 15 DDIM steps.
  c.upsampler_1024 = stage('upsampler', steps=1_000_000, batch_size=512, lr=1.2e-4)
  c.upsampler_1024.low_res = 256
  c.upsampler_1024.high_res = 1024
  c.upsampler_1024.image_size = c.upsampler_1024.get_ref('high_res')
  c.upsampler_1024.crop_frac = 0.25
  c.upsampler_1024.degradation = 'bsr'
  c.upsampler_1024.noise_aug = 0.0
  c.upsampler_1024.model = dict(channels=192, channel_mult=(1, 1, 2, 2, 4, 4),
                                num_res_blocks=2, attention_resolutions=(),
                                head_channels=64, dropout=0.0, custom_conv_grad=False,
                                image_embed_cond=False)
  c.upsampler_1024.diffusion = dict(schedule='linear', timesteps=1000, objective='eps',
                                    learned_variance=False)
  c.upsampler_1024.sample = dict(sampler='ddim', steps=15, noise_level=0.0)
  c.lock()
  return c
