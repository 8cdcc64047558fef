"""The ADM/GLIDE UNet and its decoder/upsampler wrappers: shapes, conditioning, drops,
rematerialisation, size agnosticism and FSDP-shardable logical axis names."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np
import pytest

from dalle2_jax.models import unet


def _perturb(params, seed=0, scale=0.2):
  """Random params everywhere (the zero-initialised output conv would hide everything)."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(tree, [l + scale * jax.random.normal(k, l.shape)
                                   for l, k in zip(leaves, keys)])


def _unet(**kw):
  args = dict(channels=8, out_channels=6, channel_mult=(1, 2), num_res_blocks=1,
              attention_resolutions=(4,), head_channels=8)
  args.update(kw)
  return unet.UNet(**args)


def test_unet_shapes_zero_init_and_axes():
  net = _unet()
  x, t = jnp.ones((2, 8, 8, 3)), jnp.array([3, 500])
  variables = net.init(jax.random.PRNGKey(0), x, t)
  out = net.apply(variables, x, t)
  assert out.shape == (2, 8, 8, 6) and out.dtype == jnp.float32
  np.testing.assert_array_equal(out, 0.0)   # zero-initialised output conv (ADM)
  params = variables['params']
  assert params['conv_in']['kernel'].names == (None, None, None, 'conv_out')
  assert params['down_0_res_0']['in_conv']['kernel'].names == (None, None, 'conv_in',
                                                                 'conv_out')
  assert params['conv_out']['kernel'].names == (None, None, 'conv_in', None)
  assert 'down_1_attn_0' in params and 'mid_attn' in params and 'up_1_attn_0' in params
  assert 'down_0_attn_0' not in params   # 8 px level: no attention at 8
  boxed = jax.tree.leaves(params, is_leaf=lambda v: isinstance(v, nn.Partitioned))
  assert all(isinstance(v, nn.Partitioned) for v in boxed)


@pytest.mark.parametrize('shape,groups,dtype', [((3, 8, 8, 64), 32, jnp.float32),
                                                 ((2, 4, 6, 12), 4, jnp.float32),
                                                 ((2, 5, 5, 6), 6, jnp.bfloat16)])
def test_group_norm_matches_flax(shape, groups, dtype):
  """unet.GroupNorm (two-pass statistics, written-out gradient) is nn.GroupNorm: the same
  parameters, outputs and gradients for x, scale and bias."""
  x = (3.0 * jax.random.normal(jax.random.PRNGKey(0), shape) + 1.0).astype(dtype)
  params = {'scale': jax.random.normal(jax.random.PRNGKey(1), shape[-1:]),
            'bias': jax.random.normal(jax.random.PRNGKey(2), shape[-1:])}
  ours = unet.GroupNorm(num_groups=groups, dtype=dtype)
  ref = nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=dtype)
  init = ours.init(jax.random.PRNGKey(0), x)['params']
  assert jax.tree.map(jnp.shape, nn.unbox(init)) == jax.tree.map(
      jnp.shape, ref.init(jax.random.PRNGKey(0), x)['params'])
  weights = jax.random.normal(jax.random.PRNGKey(3), shape)

  def loss(module, x, p):
    y = module.apply({'params': p}, x)
    assert y.dtype == dtype
    return jnp.sum(jnp.sin(y.astype(jnp.float32)) * weights)

  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(ours.apply({'params': params}, x), np.float32),
                             np.asarray(ref.apply({'params': params}, x), np.float32),
                             atol=tol * 10, rtol=tol)
  g_ours = jax.grad(lambda x, p: loss(ours, x, p), argnums=(0, 1))(x, params)
  g_ref = jax.grad(lambda x, p: loss(ref, x, p), argnums=(0, 1))(x, params)
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               atol=tol * 100, rtol=tol * 10)


def test_remat_does_not_change_the_function():
  x, t = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3)), jnp.array([3, 500])
  base = _unet(custom_conv_grad=False)
  params = _perturb(nn.unbox(base.init(jax.random.PRNGKey(0), x, t)['params']))
  loss = lambda net: jax.grad(lambda p: jnp.sum(jnp.square(  # noqa: E731
      net.apply({'params': p}, x, t))))(params)
  ref = loss(base)
  # Gradients reach ~500 here; float32 summation order alone moves them by up to ~1e-4
  # (in float64 remat and no remat agree to 1e-13).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4),
               loss(_unet(remat=True, custom_conv_grad=False)), ref)


def _decoder():
  return unet.Decoder(unet=_unet(), num_clip_tokens=2, text_encoder='clip')


def test_decoder_conditioning_and_drops():
  dec = _decoder()
  b = 2
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  x, t = jax.random.normal(ks[0], (b, 8, 8, 3)), jnp.array([10, 700])
  z = jax.random.normal(ks[1], (b, 16))
  enc = jax.random.normal(ks[2], (b, 5, 12))
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  params = dec.init(jax.random.PRNGKey(1), x, t, z, enc, mask)['params']
  params = _perturb(nn.unbox(params))
  f = lambda **kw: dec.apply({'params': params}, x, t, **kw)  # noqa: E731
  base = f(clip_image_embed=z, text_encodings=enc, text_mask=mask)
  enc2 = enc + jax.random.normal(ks[3], enc.shape)
  z2 = z + 1.0
  diff = lambda a, c: np.abs(np.asarray(a) - np.asarray(c)).max(axis=(1, 2, 3))  # noqa: E731
  # Both conditions reach the output.
  assert np.all(diff(base, f(clip_image_embed=z, text_encodings=enc2, text_mask=mask)) > 1e-3)
  assert np.all(diff(base, f(clip_image_embed=z2, text_encodings=enc, text_mask=mask)) > 1e-3)
  # Padding tokens are masked out.
  pad_only = enc.at[0, 3:].set(99.0)
  np.testing.assert_allclose(f(clip_image_embed=z, text_encodings=pad_only, text_mask=mask)[0],
                             base[0], atol=1e-5)
  # A dropped caption is invisible; a dropped CLIP embedding is replaced by the null one.
  keep = jnp.array([True, False])
  a = f(clip_image_embed=z, text_encodings=enc, text_mask=mask, text_keep=keep)
  c = f(clip_image_embed=z, text_encodings=enc2, text_mask=mask, text_keep=keep)
  assert diff(a, c)[0] > 1e-3 and diff(a, c)[1] < 1e-5
  a = f(clip_image_embed=z, text_encodings=enc, text_mask=mask, image_embed_keep=keep)
  c = f(clip_image_embed=z2, text_encodings=enc, text_mask=mask, image_embed_keep=keep)
  assert diff(a, c)[0] > 1e-3 and diff(a, c)[1] < 1e-5


def test_decoder_clip_embed_map():
  """clip_embed_map: the embedding also enters as a feature map at the lowest resolution
  (4 x 4 x 8 here), on its own reaching the output, and dropped with the embedding."""
  dec = unet.Decoder(unet=_unet(), num_clip_tokens=0, clip_embed_map=True)
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  x, t = jax.random.normal(ks[0], (2, 8, 8, 3)), jnp.array([10, 700])
  z = jax.random.normal(ks[1], (2, 16))
  params = nn.unbox(dec.init(jax.random.PRNGKey(1), x, t, z)['params'])
  assert params['clip_embed_map_proj']['kernel'].shape == (16, 4 * 4 * 8)
  params = _perturb(params)
  # Without the global path (timestep-embedding projection zeroed) and with no context
  # tokens, only the map carries the embedding.
  params['clip_embed_proj'] = jax.tree.map(jnp.zeros_like, params['clip_embed_proj'])
  f = lambda zz, **kw: dec.apply({'params': params}, x, t, zz, **kw)  # noqa: E731
  z2 = z + jax.random.normal(ks[2], z.shape)
  assert np.abs(f(z) - f(z2)).max(axis=(1, 2, 3)).min() > 1e-3
  keep = jnp.array([True, False])
  d = np.abs(f(z, image_embed_keep=keep) - f(z2, image_embed_keep=keep)).max(axis=(1, 2, 3))
  assert d[0] > 1e-3 and d[1] < 1e-6
  without = {k: v for k, v in params.items() if k != 'clip_embed_map_proj'}
  plain = unet.Decoder(unet=_unet(), num_clip_tokens=0)
  np.testing.assert_allclose(plain.apply({'params': without}, x, t, z),
                             plain.apply({'params': without}, x, t, z2), atol=1e-6)
  with pytest.raises(ValueError, match='extra_map'):
    _unet().apply({'params': params['unet']}, x, t, extra_map=jnp.zeros((2, 8, 8, 16)))


def test_decoder_own_text_encoder():
  dec = unet.Decoder(unet=_unet(), num_clip_tokens=2, text_encoder='own',
                     text=dict(width=16, depth=1, heads=2, vocab_size=50, context_length=6))
  x, t, z = jnp.zeros((2, 8, 8, 3)), jnp.array([1, 2]), jnp.ones((2, 16))
  tokens = jnp.array([[3, 4, 5, 0, 0, 0], [7, 8, 0, 0, 0, 0]], jnp.int32)
  params = dec.init(jax.random.PRNGKey(0), x, t, z, tokens=tokens)['params']
  assert params['text']['token_embedding']['embedding'].value.shape == (50, 16)
  assert dec.apply({'params': params}, x, t, z, tokens=tokens).shape == (2, 8, 8, 6)
  with pytest.raises(ValueError, match='tokens'):
    dec.apply({'params': params}, x, t, z)


def test_upsampler_is_size_agnostic_and_uses_low_res():
  up = unet.Upsampler(unet=_unet(attention_resolutions=(), out_channels=3),
                      noise_level_cond=True)
  x, t = jnp.zeros((1, 8, 8, 3)), jnp.array([5])
  params = _perturb(nn.unbox(up.init(jax.random.PRNGKey(0), x, t, x, t)['params']))
  big = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  low = jax.random.normal(jax.random.PRNGKey(2), (2, 16, 16, 3))
  out = up.apply({'params': params}, big, jnp.array([5, 6]), low, jnp.array([0, 100]))
  assert out.shape == (2, 32, 32, 3)
  out2 = up.apply({'params': params}, big, jnp.array([5, 6]), low * 0.5, jnp.array([0, 100]))
  assert np.abs(out - out2).max() > 1e-3
  out3 = up.apply({'params': params}, big, jnp.array([5, 6]), low, jnp.array([50, 100]))
  assert np.abs(out - out3)[0].max() > 1e-4 and np.abs(out - out3)[1].max() == 0


def test_upsampler_image_embed_cond():
  up = unet.Upsampler(unet=_unet(attention_resolutions=(), out_channels=3),
                      image_embed_cond=True)
  x, t, z = jnp.zeros((2, 8, 8, 3)), jnp.array([5, 6]), jnp.zeros((2, 16))
  params = _perturb(nn.unbox(up.init(jax.random.PRNGKey(0), x, t, x, t,
                                     clip_image_embed=z)['params']))
  assert params['clip_embed_proj']['kernel'].shape == (16, 32)
  big = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3))
  z = jax.random.normal(jax.random.PRNGKey(2), (2, 16))
  out = up.apply({'params': params}, big, t, big, clip_image_embed=z)
  out2 = up.apply({'params': params}, big, t, big, clip_image_embed=z.at[1].multiply(-1))
  assert np.abs(out - out2)[0].max() == 0 and np.abs(out - out2)[1].max() > 1e-3
  with pytest.raises(ValueError, match='clip_image_embed'):
    up.apply({'params': params}, big, t, big)
  plain = unet.Upsampler(unet=_unet(attention_resolutions=(), out_channels=3))
  assert 'clip_embed_proj' not in plain.init(jax.random.PRNGKey(0), x, t, x, t)['params']


def test_params_shard_over_fsdp():
  """With ('conv_out', 'fsdp') and ('embed', 'fsdp') rules the params are born sharded."""
  net = _decoder()
  x, t = jnp.zeros((8, 8, 8, 3)), jnp.zeros((8,), jnp.int32)
  args = (x, t, jnp.zeros((8, 16)), jnp.zeros((8, 5, 16)), jnp.ones((8, 5), bool))
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(1, 8), ('data', 'fsdp'))
  rules = (('batch', ('data', 'fsdp')), ('embed', 'fsdp'), ('conv_out', 'fsdp'),
           ('mlp', None), ('heads', None), ('kv', None), ('conv_in', None), ('length', None),
           ('vocab', None))
  abstract = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), *args))
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
  params = jax.jit(lambda: net.init(jax.random.PRNGKey(0), *args),
                   out_shardings=shardings)()
  kernel = params['params']['unet']['down_1_res_0']['in_conv']['kernel'].value
  assert tuple(kernel.sharding.spec) == (None, None, None, 'fsdp')
  assert kernel.addressable_shards[0].data.shape == (3, 3, 8, 2)


def test_attention_impl_reaches_every_attention_layer(cudnn_attention_on_cpu):
  """UNet.attention_impl='cudnn' sends each attention layer (the UNet's and the decoder's own
  caption transformer's) to the fused path (conftest's cudnn_attention_on_cpu)."""
  calls = cudnn_attention_on_cpu
  dec = unet.Decoder(unet=_unet(attention_impl='cudnn', dtype=jnp.bfloat16), num_clip_tokens=2,
                     text_encoder='own', text=dict(width=16, depth=2, heads=2, vocab_size=50,
                                                   context_length=6), dtype=jnp.bfloat16)
  x, t = jnp.zeros((2, 8, 8, 3)), jnp.array([10, 700])
  tokens = jnp.array([[3, 4, 5, 0, 0, 0], [7, 8, 0, 0, 0, 0]], jnp.int32)
  params = dec.init(jax.random.PRNGKey(1), x, t, jnp.zeros((2, 16)), tokens=tokens)
  # Attention at 4 px: down, middle and up blocks of that level; 2 caption layers.
  n_unet = sum(('attn' in k) for k in nn.unbox(params)['params']['unet'])
  assert n_unet >= 3 and calls == ['cudnn'] * (n_unet + 2)
  out = dec.apply(params, x, t, jnp.ones((2, 16)), tokens=tokens)
  assert out.shape == (2, 8, 8, 6) and np.isfinite(np.asarray(out, np.float32)).all()
