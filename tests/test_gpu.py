"""cuDNN's fused attention against ours on a real NVIDIA GPU (skipped elsewhere; CI has none).

Run on a GPU machine: DALLE2_JAX_TEST_GPU=1 python -m pytest -q tests/test_gpu.py
The CPU tests (test_clip_layers.py) check what attention_impl='cudnn' hands to
jax.nn.dot_product_attention; these check that the kernel takes it, training (gradients) and
under vmap (UnCLIP's sampler), at the models' lengths: odd ones, as with CLIP's 77-token
context, included.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle2_jax.models import layers

pytestmark = pytest.mark.skipif(jax.default_backend() != 'gpu',
                                reason='needs an NVIDIA GPU (DALLE2_JAX_TEST_GPU=1)')


def _relative_error(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12)


def _case(name, rng):
  """(module factory, input, keyword arguments, call arguments) for one model's attention."""
  if name.startswith('prior'):   # text tokens + text embed, time, noised embed, query
    length = 81 if name == 'prior_odd' else 36
    x = rng.normal(size=(4, length, 128))
    mask = np.ones((4, length), bool)
    mask[1, 70:77] = False    # a padded caption
    make = lambda impl: layers.Transformer(  # noqa: E731
        width=128, depth=2, num_heads=4, causal=True, attention_impl=impl,
        dtype=jnp.bfloat16)
    return make, x, dict(mask=jnp.asarray(mask)), dict(num_outputs=1)
  x = rng.normal(size=(4, 256, 128))    # 16 x 16 pixels
  kw = {}
  if name == 'unet_context':   # 4 CLIP-embedding tokens + 77 caption tokens
    mask = np.ones((4, 81), bool)
    mask[1, 20:] = False
    mask[2, 4:] = False        # a dropped caption
    kw = dict(context=jnp.asarray(rng.normal(size=(4, 81, 96)), jnp.float32),
              context_mask=jnp.asarray(mask))
  make = lambda impl: layers.MultiHeadAttention(  # noqa: E731
      num_heads=2, attention_impl=impl, dtype=jnp.bfloat16)
  return make, x, kw, {}


@pytest.mark.parametrize('name', ['prior_even', 'prior_odd', 'unet_context', 'unet_no_mask'])
def test_cudnn_attention_matches_ours_on_gpu(name):
  rng = np.random.default_rng(0)
  make, x, kw, call = _case(name, rng)
  x = jnp.asarray(x, jnp.float32)
  params = make('xla').init(jax.random.PRNGKey(0), x, **kw)
  weights = jnp.asarray(rng.normal(size=(128,)), jnp.float32)
  results = {}
  for impl in ('xla', 'cudnn'):
    model = make(impl)
    apply = jax.jit(lambda p, x, m=model: m.apply(p, x, **kw, **call))
    loss = lambda p, x, a=apply: jnp.sum(a(p, x).astype(jnp.float32) @ weights)  # noqa: E731
    out = apply(params, x)
    grads = jax.jit(jax.grad(loss, (0, 1)))(params, x)
    # UnCLIP's sampler vmaps the model over examples.
    one = lambda x1, kw1, m=model: m.apply(  # noqa: E731
        params, x1[None], **jax.tree.map(lambda a: a[None], kw1), **call)[0]
    batched = jax.jit(jax.vmap(one))(x, kw)
    results[impl] = (out, grads, batched)
  ours, fused = results['xla'], results['cudnn']
  assert _relative_error(ours[0], fused[0]) < 2e-2
  assert _relative_error(fused[0], fused[2]) < 2e-2
  # Each gradient within 5% of its norm, or, for the few near zero, bfloat16's noise.
  leaves = [np.asarray(a, np.float32) for a in jax.tree.leaves(ours[1])]
  scale = np.sqrt(sum(np.sum(a * a) for a in leaves))
  for a, b in zip(leaves, jax.tree.leaves(fused[1])):
    assert np.linalg.norm(a - np.asarray(b, np.float32)) < (
        5e-2 * np.linalg.norm(a) + 1e-3 * scale)
