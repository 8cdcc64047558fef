"""The CPU custom-gradient convolution matches XLA's autodiff (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle2_jax.models import conv


def _loss(fn, x, w, probe):
  return jnp.sum(jnp.tanh(fn(x, w)) * probe)


@pytest.mark.parametrize('kernel,stride,padding,hw', [
    (3, 1, 'SAME', 8), (3, 2, 'SAME', 8), (1, 1, 'SAME', 8), (1, 2, 'SAME', 8),
    (3, 2, 'SAME', 7), (3, 1, 'VALID', 6), (3, 2, ((1, 1), (1, 1)), 8),
])
def test_custom_grad_matches_autodiff(kernel, stride, padding, hw):
  assert conv.use_custom_grad(True)   # the tests run on CPU
  kx, kw, kp = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (2, hw, hw + 1, 5))
  w = jax.random.normal(kw, (kernel, kernel, 5, 4)) * 0.3
  custom = lambda x, w: conv.conv2d(x, w, (stride, stride), padding, custom_grad=True)
  xla = lambda x, w: conv.conv2d(x, w, (stride, stride), padding, custom_grad=False)
  y_c, y_x = custom(x, w), xla(x, w)
  np.testing.assert_allclose(y_c, y_x, rtol=1e-6, atol=1e-6)
  probe = jax.random.normal(kp, y_x.shape)
  g_c = jax.jit(jax.grad(lambda x, w: _loss(custom, x, w, probe), (0, 1)))(x, w)
  g_x = jax.jit(jax.grad(lambda x, w: _loss(xla, x, w, probe), (0, 1)))(x, w)
  for a, b in zip(g_c, g_x):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_conv_module_grads_and_axes():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3))
  layers = {c: conv.Conv(6, (3, 3), (2, 2), custom_grad=c) for c in (True, False)}
  params = layers[True].init(jax.random.PRNGKey(2), x)
  assert params['params']['kernel'].names == (None, None, 'conv_in', 'conv_out')
  grads = {c: jax.grad(lambda p: jnp.sum(layer.apply(p, x) ** 2))(params)
           for c, layer in layers.items()}
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               grads[True], grads[False])


def test_bad_channels_error():
  with pytest.raises(ValueError, match='channels'):
    conv.conv2d(jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 2, 4)))


@pytest.mark.parametrize('custom_grad', [False, True])
def test_upsample_conv_is_conv_of_upsampled_input(custom_grad):
  """The sub-pixel upsample conv is conv2d(nearest 2x upsample) in values and gradients,
  also at the borders (odd sizes, non-square)."""
  from dalle2_jax.models import unet  # pylint: disable=g-import-not-at-top
  kx, kw, kp = jax.random.split(jax.random.PRNGKey(1), 3)
  x = jax.random.normal(kx, (2, 5, 7, 6))
  w = jax.random.normal(kw, (3, 3, 6, 4)) * 0.3
  ref = lambda x, w: conv.conv2d(unet.upsample_nearest(x), w, custom_grad=custom_grad)
  sub = conv.upsample_conv2d
  y = sub(x, w)
  assert y.shape == (2, 10, 14, 4)
  np.testing.assert_allclose(y, ref(x, w), rtol=1e-5, atol=1e-5)
  probe = jax.random.normal(kp, y.shape)
  g_sub = jax.grad(lambda x, w: _loss(sub, x, w, probe), (0, 1))(x, w)
  g_ref = jax.grad(lambda x, w: _loss(ref, x, w, probe), (0, 1))(x, w)
  for a, b in zip(g_sub, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  params = conv.Conv(4, upsample=True).init(jax.random.PRNGKey(0), x)['params']
  assert params['kernel'].value.shape == (3, 3, 6, 4)   # the plain conv's parameters
  with pytest.raises(ValueError, match='3x3 kernel'):
    conv.upsample_conv2d(x, jnp.ones((1, 1, 6, 4)))


def test_upsample_conv_gradient_is_the_custom_one_on_cpu():
  """XLA:CPU's own gradient of the sub-pixel 2x2 convolution is ~40x slower than the
  hand-written one (conv.upsample_conv2d's docstring), so Conv(upsample=True) differentiates
  through the custom VJP even with custom_grad=False."""
  x = jnp.ones((1, 4, 4, 3))
  layer = conv.Conv(2, upsample=True, custom_grad=False)
  params = layer.init(jax.random.PRNGKey(0), x)
  assert 'custom_vjp_call' in str(jax.make_jaxpr(layer.apply)(params, x))
  plain = conv.Conv(2, custom_grad=False)
  p2 = plain.init(jax.random.PRNGKey(0), x)
  assert 'custom_vjp_call' not in str(jax.make_jaxpr(plain.apply)(p2, x))


def test_downsample_avg_is_mean_pool():
  from dalle2_jax.models import unet  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 4, 3))
  np.testing.assert_allclose(unet.downsample_avg(x),
                             x.reshape(2, 3, 2, 2, 2, 3).mean(axis=(2, 4)), rtol=1e-6, atol=1e-6)
