"""TFDS builders: captioned_shapes (generated) and image_folder (local images + .txt captions).

Both write ArrayRecord files into the TFDS data dir on first use and are read back through
`builder.as_data_source()`; neither needs TensorFlow nor the network.

  b = shapes_builder(seed=0, num_train=512, num_test=128, num_heldout=128, data_dir=...)
  b.download_and_prepare(file_format='array_record')
  src = b.as_data_source('train')     # src[i]: dict of numpy, 'image' uint8 [64, 64, 3]

  b = folder_builder('/data/my_images', data_dir=...)   # split 'train'

Once prepared, plain TFDS reads them too (after importing this module), e.g.
  tfds.data_source('captioned_shapes/seed0_train512_test128_heldout128', split='heldout',
                   data_dir=..., download=False)
or, without this module, tfds.builder_from_directory(<data_dir>/captioned_shapes/<config>/1.0.0).
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import Iterator

from absl import logging
from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds
from tensorflow_datasets.core import utils as tfds_utils

from dalle2_jax.data import captioned_shapes as cs

ARRAY_RECORD = 'array_record'
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif', '.tif', '.tiff')
_CHUNK = 500


class _LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of our builders: `code_path` without `importlib_resources`.

  TFDS 4.9.x resolves the builder's source file through `importlib_resources`, which is not
  installed on Python >= 3.9; this module's path is all it needs.
  """

  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)


def shapes_config_name(seed: int, num_train: int, num_test: int, num_heldout: int) -> str:
  """BuilderConfig name encoding the split sizes and seed (different sizes never collide)."""
  return f'seed{int(seed)}_train{int(num_train)}_test{int(num_test)}_heldout{int(num_heldout)}'


class ShapesConfig(tfds.core.BuilderConfig):
  """Split sizes and seed of a captioned_shapes build."""

  def __init__(self, *, seed=0, num_train=512, num_test=128, num_heldout=128, **kwargs):
    super().__init__(name=shapes_config_name(seed, num_train, num_test, num_heldout),
                     description='captioned_shapes with these split sizes and seed', **kwargs)
    self.seed = int(seed)
    self.num_train = int(num_train)
    self.num_test = int(num_test)
    self.num_heldout = int(num_heldout)


class CaptionedShapes(_LocalBuilder):
  """Procedurally generated shapes with captions (see captioned_shapes.md)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIG_CLASS = ShapesConfig
  # The registered default (what `tfds.builder('captioned_shapes')` makes); any other sizes
  # come in as custom configs through `shapes_builder`.
  BUILDER_CONFIGS = [ShapesConfig(num_train=50_000, num_test=1_000, num_heldout=1_000)]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=('Coloured circles, squares and triangles on black, one or two per image, '
                     'with captions and structured attributes (shape, colour, size, row, col '
                     'per object; relation; which attributes the caption names).'),
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(cs.IMAGE_SIZE, cs.IMAGE_SIZE, 3),
                                         encoding_format='png'),
            'caption': tfds.features.Text(),
            'objects': tfds.features.Tensor(shape=(2, 5), dtype=np.int32),
            'num_objects': tfds.features.Scalar(dtype=np.int32),
            'relation': tfds.features.Scalar(dtype=np.int32),
            'names': tfds.features.Tensor(shape=(4,), dtype=np.bool_),
            'index': tfds.features.Scalar(dtype=np.int32),
        }),
        disable_shuffling=True,   # stored order = index order
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    c = self.builder_config
    sizes = {'train': c.num_train, 'test': c.num_test, 'heldout': c.num_heldout}
    # TFDS cannot write an empty split: a size of 0 leaves the split out.
    return {s: self._generate_examples(s, n) for s, n in sizes.items() if n > 0}

  def _generate_examples(self, split: str, num: int) -> Iterator:
    c = self.builder_config
    # In-process: rendering + PNG encoding (~0.15 ms) is cheaper than TFDS serialising and
    # writing an example, so worker processes would not help (measured: 50,000 in ~30 s on
    # a busy 2-core machine either way), and they would need fork (unsafe next to JAX
    # threads) or spawn (re-imports the user's __main__).
    for start in range(0, num, _CHUNK):
      yield from cs.encoded_chunk((split, start, min(start + _CHUNK, num), c.seed))


def shapes_builder(*, seed=0, num_train=512, num_test=128, num_heldout=128,
                   data_dir: str | None = None) -> CaptionedShapes:
  config = ShapesConfig(seed=seed, num_train=num_train, num_test=num_test,
                        num_heldout=num_heldout)
  if config.name in CaptionedShapes.builder_configs:
    config = config.name   # TFDS refuses a custom config named like a registered one
  return CaptionedShapes(config=config, data_dir=data_dir or None, file_format=ARRAY_RECORD)


# ---------------------------------------------------------------------------------------
# Image folder (img2dataset layout): a.jpg + a.txt, possibly in sub-folders.
# ---------------------------------------------------------------------------------------


def _scan_folder(folder: str) -> list[tuple[str, str | None]]:
  """Sorted (image path, caption path or None) pairs under `folder` (recursive)."""
  pairs = []
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    names = set(files)
    for f in sorted(files):
      stem, ext = os.path.splitext(f)
      if ext.lower() in IMAGE_EXTENSIONS:
        txt = stem + '.txt'
        pairs.append((os.path.join(root, f),
                      os.path.join(root, txt) if txt in names else None))
  return pairs


def _folder_fingerprint(folder: str, pairs) -> str:
  h = hashlib.sha256(os.path.abspath(folder).encode())
  for img, txt in pairs:
    for p in (img, txt):
      if p:
        st = os.stat(p)
        h.update(f'{os.path.relpath(p, folder)}:{st.st_size}:{st.st_mtime_ns};'.encode())
  return h.hexdigest()[:12]


def to_rgb_png_or_jpeg(data: bytes) -> bytes:
  """Re-encodes an image to RGB if it is not RGB JPEG/PNG already. Raises on bad bytes."""
  with Image.open(io.BytesIO(data)) as im:
    fmt = im.format
    im.load()   # full decode: catches truncated files
    if im.mode == 'RGB' and fmt in ('JPEG', 'PNG'):
      return data
    rgb = _as_rgb(im)
  buf = io.BytesIO()
  rgb.save(buf, format='PNG')
  return buf.getvalue()


def _as_rgb(im: Image.Image) -> Image.Image:
  """Grayscale, palette, RGBA (composited on black), CMYK, 16-bit... -> RGB."""
  if im.mode == 'RGB':
    return im
  if im.mode in ('RGBA', 'LA', 'PA') or (im.mode == 'P' and 'transparency' in im.info):
    im = im.convert('RGBA')
    bg = Image.new('RGB', im.size, (0, 0, 0))
    bg.paste(im, mask=im.getchannel('A'))
    return bg
  if im.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
    arr = np.asarray(im, dtype=np.float64)
    arr = np.clip(arr / max(arr.max(), 1) * 255, 0, 255).astype(np.uint8)
    im = Image.fromarray(arr)
  return im.convert('RGB')


class FolderConfig(tfds.core.BuilderConfig):
  """A local folder of images with same-stem .txt captions."""

  def __init__(self, *, folder: str, **kwargs):
    folder = os.path.abspath(os.path.expanduser(folder))
    if not os.path.isdir(folder):
      raise FileNotFoundError(
          f'image_folder: {folder!r} is not a directory; set config.data.folder to a folder '
          'of images with same-stem .txt captions (img2dataset layout).')
    pairs = _scan_folder(folder)
    if not pairs:
      raise FileNotFoundError(
          f'image_folder: no images ({", ".join(IMAGE_EXTENSIONS)}) under {folder!r}; '
          'check config.data.folder.')
    base = ''.join(ch if ch.isalnum() else '_' for ch in os.path.basename(folder))[:40]
    super().__init__(name=f'{base or "folder"}_{_folder_fingerprint(folder, pairs)}',
                     description=f'images and captions from {folder}', **kwargs)
    self.folder = folder
    self.pairs = pairs


class ImageFolder(_LocalBuilder):
  """Images with same-stem .txt captions (missing .txt = empty caption), one split 'train'.

  Undecodable or truncated images are skipped with a warning and counted (the count is in
  `builder.info.metadata['num_skipped']`); non-RGB images are stored as RGB PNG.
  Use split slicing for a validation set, e.g. config.data.eval_split = 'train[-5%:]'.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIG_CLASS = FolderConfig

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='Local images with same-stem .txt captions.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
            'caption': tfds.features.Text(),
            'filename': tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    c = self.builder_config
    skipped = 0
    for img_path, txt_path in c.pairs:
      rel = os.path.relpath(img_path, c.folder)
      try:
        with open(img_path, 'rb') as f:
          data = to_rgb_png_or_jpeg(f.read())
      except Exception as e:  # pylint: disable=broad-except
        skipped += 1
        logging.warning('image_folder: skipping %s (cannot decode: %s); %d skipped so far.',
                        img_path, e, skipped)
        continue
      caption = ''
      if txt_path:
        with open(txt_path, 'rb') as f:
          caption = f.read().decode('utf-8', errors='replace').strip()
      yield rel, {'image': data, 'caption': caption, 'filename': rel}
    self.info.metadata['num_skipped'] = skipped
    if skipped:
      logging.warning('image_folder: %d of %d images in %s could not be decoded and were '
                      'skipped.', skipped, len(c.pairs), c.folder)


def folder_builder(folder: str, data_dir: str | None = None) -> ImageFolder:
  return ImageFolder(config=FolderConfig(folder=folder), data_dir=data_dir or None,
                     file_format=ARRAY_RECORD)
