"""configs/dalle2_paper.py instantiates abstractly (jax.eval_shape, no memory) with the
paper's parameter counts (unCLIP Table 3) within 10%."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import dalle2_paper
from dalle2_jax.models import prior as prior_lib
from dalle2_jax.tasks import decoder as decoder_task
from dalle2_jax.tasks import upsampler as upsampler_task


def _count(shapes) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))


@pytest.fixture(scope='module')
def config():
  return dalle2_paper.get_config()


def test_stages_and_tasks(config):
  assert config.stages == ('clip', 'prior', 'decoder', 'upsampler_256', 'upsampler_1024')
  assert config.upsampler_256.task == config.upsampler_1024.task == 'upsampler'
  assert config.upsampler_256.image_size == 256 and config.upsampler_1024.image_size == 1024


def test_decoder_is_3_5b(config):
  c = config
  model = decoder_task.build_decoder(c, 'decoder')
  inputs = decoder_task.decoder_inputs(c, 'decoder', 1, int(c.clip.model.embed_dim),
                                       int(c.clip.model.text.width))
  shapes = jax.eval_shape(lambda: model.init({'params': jax.random.PRNGKey(0)}, **inputs))
  n = _count(shapes)
  text = _count(shapes['params']['text'])
  assert n == pytest.approx(3.5e9, rel=0.1), n
  assert text == pytest.approx(1.2e9, rel=0.1), text   # GLIDE's text transformer


@pytest.mark.parametrize('stage,paper', [('upsampler_256', 700e6), ('upsampler_1024', 300e6)])
def test_upsamplers(config, stage, paper):
  model = upsampler_task.build_upsampler(config, stage)
  x = jnp.zeros((1, 64, 64, 3))   # size-agnostic: the count does not depend on it
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, jnp.zeros((1,)), x))
  assert _count(shapes) == pytest.approx(paper, rel=0.1), _count(shapes)


def test_prior_is_1b(config):
  c = config
  m = c.prior.model
  d, length = int(c.clip.model.embed_dim), int(c.tokenizer.context_length)
  text_width = int(c.clip.model.text.width)
  model = prior_lib.PriorTransformer(
      embed_dim=d, width=int(m.width), depth=int(m.depth), num_heads=int(m.heads),
      context_length=length, text_width=text_width, mlp_dim=m.get('mlp_dim', None))
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, d)), jnp.zeros((1,), jnp.int32),
      jnp.zeros((1, d)), jnp.zeros((1, length, text_width)), jnp.ones((1, length), bool),
      jnp.zeros((1,), bool)))
  assert _count(shapes) == pytest.approx(1e9, rel=0.1), _count(shapes)
