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
