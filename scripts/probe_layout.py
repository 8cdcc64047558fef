r"""How much of a two-object scene's layout a run's CLIP image embedding holds (captioned_shapes).

  python scripts/probe_layout.py --workdir runs/shapes                  # 2 x 1024 MLP
  python scripts/probe_layout.py --workdir runs/shapes --hidden 256
  python scripts/probe_layout.py --workdir runs/shapes --hidden ''      # linear

Renders two-object `train`-distribution scenes and `test` ones (fresh seeds), embeds them with
the run's CLIP (<workdir>/clip/export, L2-normalised) and fits a probe from the embedding to
the scene: each of the 9 cells empty or one of the 18 (colour, shape) pairs. Prints, on the
test scenes, cells right, whole scenes right, and scenes whose occupied cells are right. A
diagnostic for the decoder's conditioning (README: the CLIP embedding map); about 2 min on 2
CPU cores.
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import numpy as np
import optax

from dalle2_jax.data import captioned_shapes as cs
from dalle2_jax.evaluation import zero_shot
from dalle2_jax.models import clip as clip_lib

NUM_CLASSES = 1 + len(cs.PALETTE) * len(cs.SHAPES)   # empty, or colour x shape


def scenes(clip, split: str, num: int, seed: int):
  """(embeddings [N, D], labels int [N, 9]) for `num` two-object scenes of `split`."""
  rng = np.random.default_rng(seed)
  images, labels = [], np.zeros((num, 9), np.int32)
  for i in range(num):
    layout = cs.sample_layout(rng, split, 'two')
    images.append(cs.render(layout['objects'], layout['jitter']))
    for obj in layout['objects']:
      cell = obj[cs.ROW] * 3 + obj[cs.COL]
      labels[i, cell] = 1 + obj[cs.COLOUR] * len(cs.SHAPES) + obj[cs.SHAPE]
  return zero_shot.image_embeddings(clip, np.stack(images)), labels


class Probe(nn.Module):
  hidden: tuple[int, ...]

  @nn.compact
  def __call__(self, x):
    for width in self.hidden:
      x = nn.silu(nn.Dense(width)(x))
    return nn.Dense(9 * NUM_CLASSES)(x).reshape(-1, 9, NUM_CLASSES)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True, help='a run with a trained clip stage')
  parser.add_argument('--hidden', default='1024,1024',
                      help="the probe's hidden widths, comma separated ('' = linear)")
  parser.add_argument('--num_train', type=int, default=20000)
  parser.add_argument('--num_test', type=int, default=2000)
  parser.add_argument('--epochs', type=int, default=60)
  args = parser.parse_args()
  hidden = tuple(int(w) for w in args.hidden.split(',') if w.strip())

  clip = clip_lib.FrozenClip.load(f'{args.workdir}/clip/export')
  x_train, y_train = scenes(clip, 'train', args.num_train, seed=1)
  x_test, y_test = scenes(clip, 'test', args.num_test, seed=2)

  probe = Probe(hidden)
  params = probe.init(jax.random.PRNGKey(0), x_train[:1])
  opt = optax.adam(1e-3)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      return optax.softmax_cross_entropy_with_integer_labels(probe.apply(p, x), y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  order = np.random.default_rng(0)
  for _ in range(args.epochs):
    perm = order.permutation(args.num_train)
    for i in range(0, args.num_train, 256):
      params, opt_state, _ = step(params, opt_state, x_train[perm[i:i + 256]],
                                  y_train[perm[i:i + 256]])
  pred = np.asarray(probe.apply(params, x_test).argmax(-1))
  print(f'probe hidden={hidden or "linear"}, {args.num_train} train / {args.num_test} test '
        f'two-object scenes, {args.epochs} epochs:')
  print(f'  cells right {(pred == y_test).mean():.1%}, whole scenes right '
        f'{(pred == y_test).all(-1).mean():.1%}, occupied cells right '
        f'{((pred > 0) == (y_test > 0)).all(-1).mean():.1%}')


if __name__ == '__main__':
  main()
