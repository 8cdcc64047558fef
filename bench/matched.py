"""The benchmark configurations: ours, and DALLE2-pytorch 1.15.6's matched to them.

Every entry has our side (overrides of a stage section of configs/tiny.py, plus the CLIP
widths the stage sees) and the peer's (the spec bench/peer_dalle2_pytorch.py reads). The
mapping and the parameter counts are documented in bench/README.md; in short:

  UNet      ours channels / channel_mult / num_res_blocks  ->  Unet dim / dim_mults /
            num_resnet_blocks (same value: both add one extra residual block per level,
            ours a down/up-sampling block, theirs an initial block); attention at the same
            feature-map resolutions (theirs: `self_attn` per level); ours heads =
            channels_at_level / head_channels, theirs `attn_heads` x `attn_dim_head` with
            attn_dim_head = head_channels; their cross-attention `cond_dim` = our context
            (caption encoding) width. The CLIP image embedding is half the caption width:
            their Unet breaks when image_embed_dim == cond_dim (image_to_tokens becomes the
            identity and the null-token where() fails to broadcast).
  prior     ours width / depth / heads  ->  DiffusionPriorNetwork dim / depth / heads with
            dim_head = width / heads; their feed-forward is SwiGLU (two input matrices), so
            ff_mult is chosen to match the parameter count of our 4x GELU MLP (see README).
  batch, image size, caption length and CLIP embedding widths are identical.
"""

from __future__ import annotations

CONTEXT_LENGTH = 32   # caption tokens (ours: tokenizer.context_length; theirs: max_text_len)
# The decoder and upsampler rows use XLA's own convolution gradient, as the configs do; the
# unet_s_* pair measures both. On the 2-core CPU XLA's was 9% faster per step (decoder_s
# 0.61 vs 0.67 s, upsampler_s 0.54 vs 0.58 s, interleaved runs), once the up blocks'
# sub-pixel conv always took the hand-written one (conv.upsample_conv2d).
CUSTOM_CONV_GRAD = False
# On CPU our training steps run data parallel over this many XLA devices made of the cores
# (the config's num_cpu_devices), by kind (`--cpu_devices auto`, the default). XLA:CPU
# spreads one device's convolutions over the cores poorly, so the UNets step faster on 2;
# the prior (matmuls) does not gain, and its batch of 32 split in two was slower: prior_s
# 128 vs 171 ms, prior_m 0.85 vs 1.11 s (Intel Xeon, 2 cores, 2026-12-02; slower on two
# on the AMD EPYC too).
CPU_DEVICES = dict(prior=1, decoder=2, upsampler=2, unet=2)


def _decoder(name, size, batch, image_size, channels, channel_mult, num_res_blocks,
             attention_resolutions, head_channels, embed_dim, text_width, peer_heads,
             steps=12, warmup=2):
  n_levels = len(channel_mult)
  return dict(
      name=name, kind='decoder', size=size, steps=steps, warmup=warmup,
      ours=dict(
          stage='decoder', batch_size=batch, image_size=image_size,
          clip=dict(embed_dim=embed_dim, text_width=text_width),
          model=dict(channels=channels, channel_mult=tuple(channel_mult),
                     num_res_blocks=num_res_blocks,
                     attention_resolutions=tuple(attention_resolutions),
                     head_channels=head_channels, dropout=0.0, num_clip_tokens=4,
                     text_encoder='clip', custom_conv_grad=CUSTOM_CONV_GRAD)),
      peer=dict(
          name=name, kind='decoder', batch=batch, image_size=image_size, dim=channels,
          dim_mults=list(channel_mult), num_resnet_blocks=num_res_blocks,
          self_attn=[(image_size >> i) in attention_resolutions for i in range(n_levels)],
          attn_heads=peer_heads, attn_dim_head=head_channels, cond_dim=text_width,
          image_embed_dim=embed_dim, text_embed_dim=text_width, text_len=CONTEXT_LENGTH,
          learned_variance=True, train=dict(steps=steps, warmup=warmup)))


def _upsampler(name, size, batch, low_res, high_res, crop, channels, channel_mult,
               num_res_blocks, embed_dim, steps=12, warmup=2):
  return dict(
      name=name, kind='upsampler', size=size, steps=steps, warmup=warmup,
      ours=dict(
          stage='upsampler', batch_size=batch, low_res=low_res, high_res=high_res,
          crop_frac=crop / high_res, clip=dict(embed_dim=embed_dim, text_width=embed_dim),
          model=dict(channels=channels, channel_mult=tuple(channel_mult),
                     num_res_blocks=num_res_blocks, attention_resolutions=(),
                     head_channels=32, dropout=0.0, custom_conv_grad=CUSTOM_CONV_GRAD)),
      peer=dict(
          name=name, kind='upsampler', batch=batch, low_res=low_res, high_res=high_res,
          crop_size=crop, dim=channels, dim_mults=list(channel_mult),
          num_resnet_blocks=num_res_blocks, self_attn=[False] * len(channel_mult),
          attend_at_middle=False, image_embed_dim=embed_dim,
          train=dict(steps=steps, warmup=warmup)))


def _prior(name, size, batch, width, depth, heads, peer_ff_mult, steps=12, warmup=2):
  return dict(
      name=name, kind='prior', size=size, steps=steps, warmup=warmup,
      ours=dict(stage='prior', batch_size=batch,
                clip=dict(embed_dim=width, text_width=width),
                model=dict(width=width, depth=depth, heads=heads)),
      peer=dict(name=name, kind='prior', batch=batch, dim=width, depth=depth, heads=heads,
                dim_head=width // heads, ff_mult=peer_ff_mult, text_len=CONTEXT_LENGTH,
                cond_drop_prob=0.1, train=dict(steps=steps, warmup=warmup)))


def _unet(base, custom_conv_grad):
  """The decoder's UNet alone (eps MSE), for the CPU convolution-gradient comparison."""
  d = dict(base, name=f'unet_{base["size"]}_{"custom" if custom_conv_grad else "xla"}_grad',
           kind='unet', custom_conv_grad=custom_conv_grad)
  d['peer'] = dict(base['peer'], name=d['name'], kind='unet', learned_variance=False)
  return d


_DEC_S = _decoder('decoder_s', 's', batch=8, image_size=32, channels=64, channel_mult=(1, 2, 2),
                  num_res_blocks=2, attention_resolutions=(16, 8), head_channels=32,
                  embed_dim=32, text_width=64, peer_heads=4)
_DEC_M = _decoder('decoder_m', 'm', batch=4, image_size=64, channels=64,
                  channel_mult=(1, 2, 3, 4), num_res_blocks=2,
                  attention_resolutions=(32, 16, 8), head_channels=64, embed_dim=64,
                  text_width=128, peer_heads=4, steps=6, warmup=2)
_UP_S = _upsampler('upsampler_s', 's', batch=8, low_res=32, high_res=64, crop=32, channels=64,
                   channel_mult=(1, 2, 3), num_res_blocks=2, embed_dim=64)
_UP_M = _upsampler('upsampler_m', 'm', batch=4, low_res=64, high_res=128, crop=64,
                   channels=64, channel_mult=(1, 2, 3), num_res_blocks=2, embed_dim=64,
                   steps=6, warmup=2)
_PRIOR_S = _prior('prior_s', 's', batch=32, width=256, depth=4, heads=4, peer_ff_mult=3.5)
_PRIOR_M = _prior('prior_m', 'm', batch=32, width=512, depth=8, heads=8, peer_ff_mult=3.5)

CONFIGS = {c['name']: c for c in (
    _PRIOR_S, _PRIOR_M, _DEC_S, _DEC_M, _UP_S, _UP_M,
    _unet(_DEC_S, True), _unet(_DEC_S, False))}

TRAIN_STEP_CONFIGS = ['prior_s', 'prior_m', 'decoder_s', 'decoder_m', 'upsampler_s',
                      'upsampler_m']
CONV_GRAD_CONFIGS = ['unet_s_custom_grad', 'unet_s_xla_grad']


# --- sampling --------------------------------------------------------------------------------
# Small stages (random weights: latency does not depend on them). Steps are network calls:
# the peer's prior is asked for steps + 1 DDIM timesteps, which is `steps` calls (see
# peer_dalle2_pytorch.prior_ddim_timesteps); both sides report the calls they made.
_PIPE_CLIP = dict(embed_dim=128, text_width=128)
_PIPE_PRIOR = dict(width=128, depth=4, heads=2)
_PIPE_DECODER = dict(image_size=32, model=dict(
    channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(16,),
    head_channels=32, num_clip_tokens=4, text_encoder='clip', dropout=0.0))
_PIPE_UP = [dict(low_res=32, high_res=64, model=dict(
    channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
    head_channels=32, dropout=0.0)),
            dict(low_res=64, high_res=128, model=dict(
                channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
                head_channels=32, dropout=0.0))]


def _peer_pipeline(name, steps, batch, n_up, settings):
  d = _PIPE_DECODER['model']
  return dict(
      name=name, kind='pipeline', batch=batch, num_candidates=settings['num_candidates'],
      steps=list(steps), prior_cond_scale=settings['prior_guidance'],
      decoder_cond_scale=settings['decoder_guidance'], repeats=1,
      prior=dict(dim=_PIPE_CLIP['embed_dim'], depth=_PIPE_PRIOR['depth'],
                 heads=_PIPE_PRIOR['heads'],
                 dim_head=_PIPE_PRIOR['width'] // _PIPE_PRIOR['heads'], ff_mult=3.5,
                 text_len=CONTEXT_LENGTH),
      # cond_dim 64, not the caption width 128: theirs breaks when cond_dim == image_embed_dim.
      decoder=dict(image_size=_PIPE_DECODER['image_size'], dim=d['channels'],
                   dim_mults=list(d['channel_mult']), num_resnet_blocks=d['num_res_blocks'],
                   self_attn=[(_PIPE_DECODER['image_size'] >> i) in d['attention_resolutions']
                              for i in range(len(d['channel_mult']))],
                   attn_heads=2, attn_dim_head=d['head_channels'], cond_dim=64,
                   image_embed_dim=_PIPE_CLIP['embed_dim'],
                   text_embed_dim=_PIPE_CLIP['text_width'], text_len=CONTEXT_LENGTH),
      upsamplers=[dict(high_res=u['high_res'], dim=u['model']['channels'],
                       dim_mults=list(u['model']['channel_mult']),
                       num_resnet_blocks=u['model']['num_res_blocks'],
                       self_attn=[False] * len(u['model']['channel_mult']),
                       attend_at_middle=False,
                       image_embed_dim=_PIPE_CLIP['embed_dim']) for u in _PIPE_UP[:n_up]])


def _pipeline(name, preset, steps, batch):
  n_up = len(steps) - 2
  settings = dict(steps=tuple(steps), prior_guidance=4.0, decoder_guidance=3.0,
                  num_candidates=2)
  return dict(name=name, preset=preset, mode='pipeline', batch=batch, clip=_PIPE_CLIP,
              repeats=2 if preset == 'fast' else 1,
              prior=_PIPE_PRIOR, decoder=_PIPE_DECODER, upsamplers=_PIPE_UP[:n_up],
              settings=settings, peer=_peer_pipeline(name, steps, batch, n_up, settings))


SAMPLING = {s['name']: s for s in (
    _pipeline('pipeline_fast', 'fast', (25, 25, 7), batch=4),
    _pipeline('pipeline_paper', 'paper', (64, 250, 27, 15), batch=2),
)}


# --- GPU (ours only; bfloat16 compute, float32 parameters and optimizer state) ---------------
# Sizes of configs/coco64.py (the GPU recipe) and the paper's prior, at batches that keep an
# 80 GB H100 busy. MFU is against a bfloat16 8192^3 matmul measured in the same process.
# Attention is cuDNN's fused kernel (`attention_impl='cudnn'`), convolution gradients cuDNN's.
def _gpu(spec, dtype='bfloat16'):
  spec = dict(spec, ours=dict(spec['ours'], dtype=dtype), peer=None)
  model = dict(spec['ours'].get('model', {}))
  if 'custom_conv_grad' in model:
    model['custom_conv_grad'] = False
  if spec['kind'] in ('prior', 'decoder'):
    model['attention_impl'] = 'cudnn'
  spec['ours']['model'] = model
  return spec


_GPU_TRAIN = (
    _prior('prior_gpu_m', 'gpu_m', batch=512, width=1024, depth=16, heads=16,
           peer_ff_mult=3.5, steps=30, warmup=5),
    _prior('prior_gpu_l', 'gpu_l', batch=256, width=2048, depth=24, heads=32,
           peer_ff_mult=3.5, steps=20, warmup=5),
    _decoder('decoder_gpu_s', 'gpu_s', batch=256, image_size=64, channels=128,
             channel_mult=(1, 2, 3, 4), num_res_blocks=2, attention_resolutions=(16, 8),
             head_channels=64, embed_dim=512, text_width=512, peer_heads=8, steps=20,
             warmup=5),
    # Batch 128 ran out of memory on an 80 GB H100 with XLA's attention (a 49.8 GiB
    # allocation: the float32 attention logits at 32 px, 1024 tokens); batch 64 with cuDNN's
    # fused attention, which keeps no logits, has not run as a training step yet (its sizes
    # sampled at 64 px on an H200: README Performance).
    _decoder('decoder_gpu_m', 'gpu_m', batch=64, image_size=64, channels=192,
             channel_mult=(1, 2, 3, 4), num_res_blocks=3, attention_resolutions=(32, 16, 8),
             head_channels=64, embed_dim=512, text_width=512, peer_heads=12, steps=20,
             warmup=5),
    _upsampler('upsampler_gpu_m', 'gpu_m', batch=128, low_res=64, high_res=256, crop=64,
               channels=128, channel_mult=(1, 2, 3, 4), num_res_blocks=2, embed_dim=512,
               steps=20, warmup=5),
)
CONFIGS.update({c['name']: _gpu(c) for c in _GPU_TRAIN})
GPU_TRAIN_STEP_CONFIGS = [c['name'] for c in _GPU_TRAIN]

# The sampling pipeline's stages are the training configs' decoder and upsampler (and their
# CLIP); the prior is prior_gpu_m's width and depth.
_GPU_DEC, _GPU_UPS = CONFIGS['decoder_gpu_m']['ours'], CONFIGS['upsampler_gpu_m']['ours']
_GPU_CLIP = _GPU_DEC['clip']
_GPU_PRIOR = dict(width=1024, depth=16, heads=16, attention_impl='cudnn')
_GPU_DECODER = dict(image_size=_GPU_DEC['image_size'], model=_GPU_DEC['model'])
_GPU_UP = dict(low_res=_GPU_UPS['low_res'], high_res=_GPU_UPS['high_res'],
               model=_GPU_UPS['model'])


def _gpu_pipeline(name, steps, batch):
  return dict(name=name, preset='fast', mode='pipeline', batch=batch, clip=_GPU_CLIP,
              repeats=3, prior=_GPU_PRIOR, decoder=_GPU_DECODER,
              upsamplers=[_GPU_UP][:len(steps) - 2], dtype='bfloat16', peer=None,
              settings=dict(steps=tuple(steps), prior_guidance=4.0, decoder_guidance=3.0,
                            num_candidates=2))


SAMPLING.update({s['name']: s for s in (
    _gpu_pipeline('gpu_fast_64', (25, 25), batch=128),
    _gpu_pipeline('gpu_fast_256', (25, 25, 7), batch=128),
)})
GPU_SAMPLING = ['gpu_fast_64', 'gpu_fast_256']
CPU_SAMPLING = ['pipeline_fast', 'pipeline_paper']


def cpu_devices_arg(value: str) -> str:
  """argparse type of --cpu_devices: 'auto' or a positive number of CPU devices."""
  if value != 'auto' and not (value.isdigit() and int(value) >= 1):
    raise ValueError(value)
  return value


def cpu_devices(name: str, requested: str) -> int:
  """The CPU devices config `name` trains on: CPU_DEVICES of its kind for 'auto', else
  `requested`."""
  return CPU_DEVICES[CONFIGS[name]['kind']] if requested == 'auto' else int(requested)
