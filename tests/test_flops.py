"""Analytic forward FLOPs agree with XLA's cost analysis on tiny models (within 15%)."""

import jax
import jax.numpy as jnp
import pytest

from dalle2_jax.models import flops
from dalle2_jax.models import layers
from dalle2_jax.models import unet


def _xla_flops(fn, *args):
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost['flops'])


@pytest.mark.parametrize('attn,ctx', [((), 0), ((8,), 0), ((8, 4), 6)])
def test_unet_flops_match_xla(attn, ctx):
  size, b = 16, 2
  net = unet.UNet(channels=16, out_channels=6, channel_mult=(1, 2, 2), num_res_blocks=1,
                  attention_resolutions=attn, head_channels=8)
  x, t = jnp.zeros((b, size, size, 3)), jnp.zeros((b,))
  context = jnp.zeros((b, ctx, 24)) if ctx else None
  params = net.init(jax.random.PRNGKey(0), x, t, context=context)
  measured = _xla_flops(lambda p, x, t, c: net.apply(p, x, t, context=c), params, x, t,
                        context) / b
  analytic = flops.unet_flops(size, 16, (1, 2, 2), 1, attn, out_channels=6,
                              context_len=ctx, context_width=24)
  assert analytic == pytest.approx(measured, rel=0.15)


@pytest.mark.parametrize('num_outputs', [None, 1])
def test_transformer_flops_match_xla(num_outputs):
  b, length, width, depth = 2, 16, 128, 2
  net = layers.Transformer(width=width, depth=depth, num_heads=4)
  x = jnp.zeros((b, length, width))
  params = net.init(jax.random.PRNGKey(0), x)
  measured = _xla_flops(
      lambda p, x: net.apply(p, x, num_outputs=num_outputs), params, x) / b
  analytic = flops.transformer_flops(length, width, depth, num_outputs=num_outputs)
  assert analytic == pytest.approx(measured, rel=0.15)
