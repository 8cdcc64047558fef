r"""Draws each stage's training loss from <workdir>/<stage>/metrics.jsonl into one PNG.

  python scripts/plot_curves.py --workdir runs/shapes --out docs/shapes_loss_curves.png

One panel per stage (in the run's order), loss against step (log scale when the loss falls
more than tenfold), with the first and last logged values printed; drawn with PIL so that no plotting library is needed. Also prints a table of
the logged losses (Markdown) for the README.
"""

from __future__ import annotations

import argparse
import json
import math
import os

from PIL import Image, ImageDraw

PANEL_W, PANEL_H, MARGIN = 360, 220, 44


def read_losses(path: str, key: str = 'loss') -> list[tuple[int, float]]:
  points = {}
  with open(path) as f:
    for line in f:
      rec = json.loads(line)
      if key in rec and 'step' in rec:
        points[int(rec['step'])] = float(rec[key])   # a resumed run rewrites steps: last wins
  return sorted(points.items())


def panel(title: str, points: list[tuple[int, float]]) -> Image.Image:
  im = Image.new('RGB', (PANEL_W, PANEL_H), 'white')
  d = ImageDraw.Draw(im)
  x0, y0, x1, y1 = MARGIN, 24, PANEL_W - 12, PANEL_H - 28
  d.rectangle((x0, y0, x1, y1), outline=(160, 160, 160))
  if len(points) < 2:
    d.text((x0, 6), title, fill='black')
    d.text((x0 + 8, y0 + 8), 'fewer than 2 logged steps', fill='black')
    return im
  steps = [s for s, _ in points]
  vals = [v for _, v in points]
  lo, hi = min(vals), max(vals)
  hi = hi if hi > lo else lo + 1e-6
  log = lo > 0 and hi / lo > 10
  f = math.log if log else (lambda v: v)
  if log:
    title += ' (log scale)'

  def xy(s, v):
    return (x0 + (s - steps[0]) / max(steps[-1] - steps[0], 1) * (x1 - x0),
            y1 - (f(v) - f(lo)) / (f(hi) - f(lo)) * (y1 - y0))
  d.text((x0, 6), title, fill='black')
  d.line([xy(s, v) for s, v in points], fill=(30, 90, 200), width=2)
  d.text((4, y0), f'{hi:.3g}', fill='black')
  d.text((4, y1 - 10), f'{lo:.3g}', fill='black')
  d.text((x0, y1 + 6), f'step {steps[0]}', fill='black')
  d.text((x1 - 70, y1 + 6), f'step {steps[-1]}', fill='black')
  return im


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[1])
  ap.add_argument('--workdir', required=True)
  ap.add_argument('--out', required=True)
  ap.add_argument('--stages', default='', help='comma-separated; default: every stage dir')
  args = ap.parse_args()
  stages = [s for s in args.stages.split(',') if s] or sorted(
      s for s in os.listdir(args.workdir)
      if os.path.exists(os.path.join(args.workdir, s, 'metrics.jsonl')))
  order = {'clip': 0, 'prior': 1, 'decoder': 2}
  stages.sort(key=lambda s: (order.get(s, 3), s))
  panels, rows = [], []
  for s in stages:
    pts = read_losses(os.path.join(args.workdir, s, 'metrics.jsonl'))
    panels.append(panel(f'{s}: loss', pts))
    if pts:
      marks = [pts[0], pts[len(pts) // 4], pts[len(pts) // 2], pts[-1]]
      rows.append(f'| {s} | ' + ' | '.join(f'{v:.4g} (step {k})' for k, v in marks) + ' |')
  cols = 2
  grid = Image.new('RGB', (cols * PANEL_W, -(-len(panels) // cols) * PANEL_H), 'white')
  for i, p in enumerate(panels):
    grid.paste(p, ((i % cols) * PANEL_W, (i // cols) * PANEL_H))
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  grid.save(args.out)
  print('| stage | first | 1/4 | 1/2 | last |\n|---|---|---|---|---|')
  print('\n'.join(rows))
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
