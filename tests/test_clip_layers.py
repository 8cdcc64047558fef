"""Tests of the shared transformer layers (dalle2_jax/models/layers.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle2_jax.models import layers


def _init_apply(module, *args, **kwargs):
  params = module.init(jax.random.PRNGKey(0), *args, **kwargs)
  return params, lambda *a, **k: module.apply(params, *a, **k)


def test_causal_transformer_ignores_future_tokens():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 16))
  model = layers.Transformer(width=16, depth=2, num_heads=4, causal=True,
                             activation='quick_gelu')
  _, apply = _init_apply(model, x)
  y1 = apply(x)
  y2 = apply(x.at[:, 4:].set(7.0))
  np.testing.assert_allclose(y1[:, :4], y2[:, :4], atol=1e-6)
  assert not np.allclose(y1[:, 4:], y2[:, 4:])


def test_padding_mask_hides_keys_and_remat_matches():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 8))
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  model = layers.Transformer(width=8, depth=1, num_heads=2)
  params, apply = _init_apply(model, x, mask)
  y1 = apply(x, mask)
  y2 = apply(x.at[0, 3:].set(-3.0), mask)
  np.testing.assert_allclose(y1[0, :3], y2[0, :3], atol=1e-6)
  remat = layers.Transformer(width=8, depth=1, num_heads=2, remat=True)
  np.testing.assert_allclose(remat.apply(params, x, mask), y1, atol=1e-6)
  # Gradients flow through the rematerialised block.
  g = jax.grad(lambda p: remat.apply(p, x, mask).sum())(params)
  assert all(np.isfinite(v).all() for v in jax.tree.leaves(g))


@pytest.mark.parametrize('remat', [False, True])
@pytest.mark.parametrize('with_context', [False, True])
def test_num_outputs_gives_the_last_rows_and_their_gradients(remat, with_context):
  """The final block computing only the last n positions changes nothing the caller reads:
  outputs and parameter gradients equal the full transformer's, with causal and padding
  masks and a masked context."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 7, 16)), jnp.float32)
  mask = jnp.array([[1, 1, 1, 1, 0, 1, 1], [1] * 7], bool)
  kw = {}
  if with_context:
    kw = dict(context=jnp.asarray(rng.normal(size=(2, 3, 5)), jnp.float32),
              context_mask=jnp.array([[1, 1, 0], [1, 0, 0]], bool))
  model = layers.Transformer(width=16, depth=3, num_heads=4, causal=True, remat=remat)
  params = model.init(jax.random.PRNGKey(0), x, mask, **kw)
  full = model.apply(params, x, mask, **kw)
  for n in (1, 3):
    part = model.apply(params, x, mask, num_outputs=n, **kw)
    assert part.shape == (2, n, 16)
    np.testing.assert_allclose(part, full[:, -n:], rtol=1e-5, atol=1e-5)
  weights = jnp.asarray(rng.normal(size=(16,)), jnp.float32)
  g_full = jax.grad(lambda p: jnp.sum(model.apply(p, x, mask, **kw)[:, -1] @ weights))(params)
  g_part = jax.grad(lambda p: jnp.sum(
      model.apply(p, x, mask, num_outputs=1, **kw)[:, -1] @ weights))(params)
  for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_part)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match='num_queries=8'):
    model.apply(params, x, mask, num_outputs=8, **kw)


def test_attention_matches_naive_and_context_is_attended():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(1, 3, 8)), jnp.float32)
  ctx = jnp.asarray(rng.normal(size=(1, 2, 5)), jnp.float32)
  attn = layers.MultiHeadAttention(num_heads=2, causal=True)
  params = attn.init(jax.random.PRNGKey(0), x, context=ctx)
  p = nn.unbox(params)['params']
  assert p['query']['kernel'].shape == (8, 2, 4)
  assert p['context_key']['kernel'].shape == (5, 2, 4)
  assert p['out']['kernel'].shape == (2, 4, 8)
  # Logical names are attached for the engine.
  assert params['params']['query']['kernel'].names == ('embed', 'heads', 'kv')
  y = attn.apply(params, x, context=ctx)

  def proj(name, inp):
    return np.einsum('blw,whd->blhd', inp, p[name]['kernel']) + p[name]['bias']
  q, k, v = proj('query', x), proj('key', x), proj('value', x)
  k = np.concatenate([proj('context_key', ctx), k], 1)
  v = np.concatenate([proj('context_value', ctx), v], 1)
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) / 2.0
  allowed = np.concatenate([np.ones((3, 2), bool), np.tril(np.ones((3, 3), bool))], 1)
  logits = np.where(allowed, logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.einsum('bhqk,bkhd->bqhd', probs, v)
  ref = np.einsum('bqhd,hdw->bqw', out, p['out']['kernel']) + p['out']['bias']
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', ['quick_gelu', 'gelu'])
def test_activations(name):
  x = jnp.linspace(-3, 3, 7)
  y = layers.get_activation(name)(x)
  if name == 'quick_gelu':
    ref = x / (1 + np.exp(-1.702 * x))
  else:
    from math import erf  # pylint: disable=g-import-not-at-top
    ref = np.array([v * 0.5 * (1 + erf(v / np.sqrt(2))) for v in np.asarray(x)])
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='activation'):
    layers.get_activation('swish')


@pytest.mark.parametrize('mask_shape', [None, (2, 1, 1, 9), (2, 1, 5, 9), (2, 3, 5, 9)])
def test_attend_fused_arguments_match_ours_in_float32(mask_shape):
  """The fused path's arguments (q, k, v in the compute dtype, the mask broadcast over every
  query row) through jax's generic XLA implementation give our float32 attention and its
  gradients exactly, for the mask shapes MultiHeadAttention makes."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, n, 3, 8)), jnp.float32) for n in (5, 9, 9))
  mask = None if mask_shape is None else jnp.asarray(rng.random(mask_shape) < 0.7)
  if mask is not None:
    mask = mask.at[..., 0].set(True)
  f = lambda fused: lambda q, k, v: layers.attend(  # noqa: E731
      q, k, v, mask, jnp.float32, fused=fused)
  w = jnp.asarray(rng.normal(size=(2, 5, 3, 8)), jnp.float32)
  for a, b in zip((f(None)(q, k, v),) + jax.grad(lambda *a: jnp.sum(f(None)(*a) * w),
                                                 (0, 1, 2))(q, k, v),
                  (f('xla')(q, k, v),) + jax.grad(lambda *a: jnp.sum(f('xla')(*a) * w),
                                                  (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_attend_hands_cudnn_only_what_it_takes(monkeypatch):
  """What an H200 run showed cuDNN's fused attention (jax 0.11.2) refuses: a single query
  row (the prior's last block: 'Unsupported sequence length Q 1') goes the plain path; with
  a mask (a bias) its training kernel takes even lengths only (jax's
  check_is_flash_attention), so odd ones are padded (5 queries, 9 keys -> 6, 10); and under
  vmap (UnCLIP's sampler) the mask carries every head, since the kernel's batching rule
  reshapes it to [batch x B, heads, Lq, Lk]."""
  seen = []

  def fake(q, k, v, mask=None, scale=None, implementation=None):
    seen.append((q.shape, None if mask is None else mask.shape, implementation))
    return q
  monkeypatch.setattr(jax.nn, 'dot_product_attention', fake)
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(4, 2, n, 3, 8)), jnp.bfloat16) for n in (5, 9, 9))
  mask = jnp.ones((4, 2, 1, 1, 9), bool)
  jax.vmap(lambda q, k, v, m: layers.attend(q, k, v, m, jnp.bfloat16, fused='cudnn'))(
      q, k, v, mask)
  assert seen == [((2, 6, 3, 8), (2, 3, 6, 10), 'cudnn')]
  seen.clear()
  out = layers.attend(q[0, :, :1], k[0], v[0], mask[0], jnp.bfloat16, fused='cudnn')
  assert not seen and out.shape == (2, 1, 3, 8)


@pytest.mark.parametrize('case', ['prior', 'unet', 'no_mask'])
def test_fused_attention_path_matches_ours(cudnn_attention_on_cpu, case):
  """attention_impl='cudnn' hands q, k, v and the mask to jax.nn.dot_product_attention.
  Its XLA implementation, given the same arguments (conftest's cudnn_attention_on_cpu), must
  give our bfloat16 outputs and gradients for the masks the models make: causal + key
  padding + a masked context and one output row (the prior), a padded context in front of
  unmasked pixels (the decoder UNet), none."""
  dtype = jnp.bfloat16
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 7, 16)), jnp.float32)
  kw, call = {}, {}
  if case == 'prior':
    make = lambda impl: layers.Transformer(  # noqa: E731
        width=16, depth=2, num_heads=2, causal=True, attention_impl=impl, dtype=dtype)
    kw = dict(mask=jnp.array([[1, 1, 1, 1, 0, 1, 1], [1] * 7], bool),
              context=jnp.asarray(rng.normal(size=(2, 3, 5)), jnp.float32),
              context_mask=jnp.array([[1, 1, 0], [1, 0, 0]], bool))
    call = dict(num_outputs=1)
  else:
    make = lambda impl: layers.MultiHeadAttention(  # noqa: E731
        num_heads=2, attention_impl=impl, dtype=dtype)
    if case == 'unet':
      kw = dict(context=jnp.asarray(rng.normal(size=(2, 4, 6)), jnp.float32),
                context_mask=jnp.array([[1, 1, 1, 0], [1, 0, 0, 0]], bool))
  weights = jnp.asarray(rng.normal(size=(16,)), jnp.float32)
  results = []
  for impl in ('xla', 'cudnn'):
    model = make(impl)
    params = model.init(jax.random.PRNGKey(0), x, **kw)
    loss = lambda p, x, m=model: jnp.sum(  # noqa: E731
        m.apply(p, x, **kw, **call).astype(jnp.float32) @ weights)
    results.append((model.apply(params, x, **kw, **call), jax.grad(loss, (0, 1))(params, x)))
  assert set(cudnn_attention_on_cpu) == {None, 'cudnn'}
  ours, fused = results
  tol = dict(rtol=5e-2, atol=5e-2)
  assert ours[0].dtype == fused[0].dtype
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(fused)):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol)
  # The padded context keys are invisible on the fused path too.
  if case == 'unet':
    moved = dict(kw, context=kw['context'].at[1, 1:].set(50.0))
    np.testing.assert_allclose(model.apply(params, x, **moved)[1], fused[0][1], **tol)


def test_attention_impl_errors_name_the_field(monkeypatch):
  check = layers.check_attention_impl
  with pytest.raises(ValueError, match=r"decoder.model.attention_impl='flash'; choose one"):
    check('flash', jnp.float32, field='config.decoder.model.attention_impl')
  check('xla', jnp.float32)
  if jax.default_backend() != 'gpu':
    with pytest.raises(ValueError, match="runs on NVIDIA GPUs only.*attention_impl='xla'"):
      check('cudnn', jnp.bfloat16)
    x = jnp.zeros((1, 3, 8))
    attn = layers.MultiHeadAttention(num_heads=2, attention_impl='cudnn', dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match='NVIDIA GPUs only'):
      attn.init(jax.random.PRNGKey(0), x)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  with pytest.raises(ValueError, match=r"needs bfloat16 or float16 compute, got float32: "
                                       r"set config.prior.dtype='bfloat16'"):
    check('cudnn', jnp.float32, field='config.prior.model.attention_impl',
          dtype_field='config.prior.dtype')
  with pytest.raises(ValueError, match='multiple of 8 and at most 128, got 12'):
    check('cudnn', jnp.bfloat16, head_dim=12)
  check('cudnn', jnp.float16, head_dim=64)


def test_patch_embedding_is_the_strided_convolution():
  """CLIP's patch embedding (`patchify`, then a matmul over the flattened patches)
  computes OpenAI's strided p x p convolution with the same [p, p, C, width] kernel, values
  and gradients."""
  from dalle2_jax.models import clip  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 12, 12, 5))
  module = clip.PatchEmbedding(patch_size=4, width=7)
  params = module.init(jax.random.PRNGKey(0), clip.patchify(x, 4))
  kernel = nn.unbox(params)['params']['kernel']
  assert kernel.shape == (4, 4, 5, 7)

  def conv(x, kernel):
    y = jax.lax.conv_general_dilated(x, kernel, (4, 4), 'VALID',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return y.reshape(2, 9, 7)
  ours = lambda x, kernel: module.apply({'params': {'kernel': kernel}}, clip.patchify(x, 4))
  np.testing.assert_allclose(ours(x, kernel), conv(x, kernel), rtol=1e-5, atol=1e-5)
  w = jax.random.normal(jax.random.PRNGKey(2), (2, 9, 7))
  grads = [jax.grad(lambda x, k, f=f: jnp.sum(f(x, k) * w), argnums=(0, 1))(x, kernel)
           for f in (ours, conv)]
  for a, b in zip(*grads):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
