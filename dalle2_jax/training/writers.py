"""Where training metrics go: a console progress line, TensorBoard, and a JSONL file.

Sample grids (`sample_every`) also go to <workdir>/<stage>/samples/<name>_<step>.png, to look
at without TensorBoard.

Only process 0 writes (other processes get a writer that does nothing).

TensorBoard event files are written with tensorboardX: it is maintained, writes the
standard event format (scalars and images) without TensorFlow, which the project does not
install (clu's and flax's metric writers need TensorFlow for TensorBoard summaries).
The JSONL file (<workdir>/<stage>/metrics.jsonl, one object per logged step) is for
scripts; after a resume, a step may appear twice: the later line wins.
"""

from __future__ import annotations

import datetime
import json
import math
import sys
import time
from typing import Any, Mapping

from absl import logging
from etils import epath
import jax
import numpy as np

METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'
SAMPLES_DIR = 'samples'


def image_grid(images: np.ndarray, columns: int | None = None, pad: int = 0) -> np.ndarray:
  """[B, H, W, C] uint8, or float in [-1, 1] -> one uint8 grid, `pad` black pixels apart."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    images = np.clip(np.round((images.astype(np.float32) + 1.0) * 127.5), 0, 255)
    images = images.astype(np.uint8)
  b, h, w, c = images.shape
  columns = min(columns or max(1, int(math.ceil(math.sqrt(b)))), b)
  rows = int(math.ceil(b / columns))
  grid = np.zeros((rows * (h + pad) + pad, columns * (w + pad) + pad, c), np.uint8)
  for i in range(b):
    r, col = divmod(i, columns)
    y, x = pad + r * (h + pad), pad + col * (w + pad)
    grid[y:y + h, x:x + w] = images[i]
  return grid


def write_png(path, image: np.ndarray) -> None:
  """Writes a uint8 [H, W, 3] or [H, W, 1] image as PNG (a local path or any epath)."""
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = np.asarray(image, np.uint8)
  buf = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format='PNG')
  epath.Path(path).write_bytes(buf.getvalue())


def _format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  return str(datetime.timedelta(seconds=int(round(seconds))))


class ProgressBar:
  """`stage [#####-----] step/total loss .. | steps/s | examples/s | ETA` on stderr."""

  def __init__(self, name: str, total: int, width: int = 20, stream=None):
    self.name, self.total, self.width = name, total, width
    self.stream = stream or sys.stderr
    self.tty = hasattr(self.stream, 'isatty') and self.stream.isatty()

  def update(self, step: int, loss: float, steps_per_s: float, examples_per_s: float):
    done = int(self.width * step / max(self.total, 1))
    eta = (self.total - step) / steps_per_s if steps_per_s > 0 else float('inf')
    line = (f'{self.name} [{"#" * done}{"-" * (self.width - done)}] {step}/{self.total} '
            f'loss {loss:.4g} | {steps_per_s:.2f} steps/s | {examples_per_s:.1f} ex/s | '
            f'ETA {_format_duration(eta)}')
    self.stream.write(('\r' + line) if self.tty else line + '\n')
    self.stream.flush()

  def close(self):
    if self.tty:
      self.stream.write('\n')
      self.stream.flush()


class MetricWriter:
  """Console + TensorBoard + JSONL for one stage; inert on processes other than 0."""

  def __init__(self, stage_dir, stage: str, total_steps: int, *, console: bool = True):
    self.active = jax.process_index() == 0
    self.stage = stage
    if not self.active:
      return
    stage_dir = epath.Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    self.samples_dir = stage_dir / SAMPLES_DIR
    self.jsonl_path = stage_dir / METRICS_FILE
    self._jsonl = self.jsonl_path.open('a')
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._tb = SummaryWriter(logdir=str(stage_dir / TENSORBOARD_DIR), flush_secs=10)
    self._progress = ProgressBar(stage, total_steps) if console else None

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.active:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({'step': int(step), 'time': time.time(), **scalars}) + '\n')
    self._jsonl.flush()
    for k, v in scalars.items():
      if not math.isfinite(v):   # in the JSONL; TensorBoard would only warn about it
        continue
      self._tb.add_scalar(f'{self.stage}/{k}', v, int(step))
    if self._progress is not None:
      self._progress.update(int(step), scalars.get('loss', float('nan')),
                            scalars.get('steps_per_s', 0.0),
                            scalars.get('examples_per_s', 0.0))

  def write_images(self, step: int, name: str, images: np.ndarray) -> None:
    if not self.active:
      return
    grid = image_grid(images)
    self._tb.add_image(f'{self.stage}/{name}', grid, int(step), dataformats='HWC')
    self.samples_dir.mkdir(parents=True, exist_ok=True)
    write_png(self.samples_dir / f'{name}_{int(step):07d}.png', grid)

  def write_text(self, step: int, name: str, text: str) -> None:
    if self.active:
      self._tb.add_text(f'{self.stage}/{name}', text, int(step))

  def close(self) -> None:
    if not self.active:
      return
    if self._progress is not None:
      self._progress.close()
    self._jsonl.close()
    self._tb.close()


def read_metrics(stage_dir) -> dict[int, dict]:
  """step -> metrics of <stage_dir>/metrics.jsonl (the last line of a step wins)."""
  out = {}
  path = epath.Path(stage_dir) / METRICS_FILE
  if not path.exists():
    return out
  for line in path.read_text().splitlines():
    if line.strip():
      try:
        row = json.loads(line)
      except json.JSONDecodeError:   # a line cut short by a kill
        logging.warning('Skipping a malformed line of %s', path)
        continue
      out[row['step']] = row
  return out
