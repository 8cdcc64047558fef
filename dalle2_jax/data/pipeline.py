"""Input pipeline: TFDS data source -> grain -> per-process numpy batch -> global jax.Arrays.

  it = make_input(config, 'train', global_batch_size=256, mesh=mesh)
  batch = next(it)      # {'image': f32 [B, H, W, 3] in [-1, 1], 'tokens': i32 [B, L]}
  state = it.get_state()   # JSON-serialisable; it.set_state(state) resumes exactly there

Datasets (config.data.name):
  'captioned_shapes'  generated into the TFDS data dir on first use (config.data.shapes sets
                      split sizes and seed; see captioned_shapes.md).
  'image_folder'      config.data.folder: images with same-stem .txt captions (img2dataset
                      layout), converted once into the TFDS data dir; split 'train' (slice it,
                      e.g. 'train[:95%]' / 'train[95%:]').
  any TFDS name       prepared in config.data.data_dir as array_record, with an image feature
                      (config.data.image_key) and a caption feature (config.data.caption_key;
                      '/' for nested keys, e.g. 'captions/text' for coco_captions; a list of
                      captions picks one at random, deterministically from the seed).

Each process reads its own 1/process_count of the (seeded, shuffled) records and builds a
per-process batch of global_batch_size / process_count; the global arrays are sharded over the
mesh axes ('data', 'fsdp') on the batch dimension. Training input repeats epochs forever.
Images that cannot be decoded are skipped with a warning (and counted in `it.num_skipped`
when worker_count is 0); grayscale, palette and RGBA images are converted to RGB; empty
captions are valid. config.data.cache_decoded (default False) keeps each decoded record in
host memory after its first read (the split's images at the stage's size, H x W x 3 bytes
each), for splits small enough that reading and decoding them every epoch is the cost.
"""

from __future__ import annotations

import io
import json
import os
import struct
from typing import Any, Callable, Mapping

from absl import logging
import grain.python as grain
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
from PIL import Image
import zlib

from dalle2_jax import tokenizer as tokenizer_lib

BATCH_AXES = ('data', 'fsdp')
SHAPES_ATTRIBUTES = ('objects', 'num_objects', 'relation', 'names')


# ---------------------------------------------------------------------------------------
# Data sources
# ---------------------------------------------------------------------------------------


def _get(cfg, key, default=None):
  try:
    return cfg[key]
  except (KeyError, AttributeError):
    return default


def _data_dir(config) -> str | None:
  d = _get(config.data, 'data_dir', '') or ''
  return os.path.expanduser(d) if d else None


def _split_feature(features, key: str):
  """The feature at a '/'-separated key, or None."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  feat = features
  for part in key.split('/'):
    if isinstance(feat, tfds.features.Sequence):
      feat = feat.feature
    if not isinstance(feat, tfds.features.FeaturesDict) or part not in feat.keys():
      return None
    feat = feat[part]
  return feat


def _feature_keys(features, prefix='') -> list[str]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  out = []
  if isinstance(features, tfds.features.Sequence):
    features = features.feature
  if isinstance(features, tfds.features.FeaturesDict):
    for k in features.keys():
      out.append(prefix + k)
      out += _feature_keys(features[k], prefix + k + '/')
  return out


def get_builder(config):
  """The TFDS builder of config.data, prepared (captioned_shapes / image_folder are generated
  on first use; other datasets must already be prepared in config.data.data_dir)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from dalle2_jax.data import builders  # pylint: disable=g-import-not-at-top
  name = config.data.name
  data_dir = _data_dir(config)
  if name == 'captioned_shapes':
    s = config.data.shapes
    b = builders.shapes_builder(seed=s.seed, num_train=s.num_train, num_test=s.num_test,
                                num_heldout=s.num_heldout, data_dir=data_dir)
    if not b.is_prepared():
      b.download_and_prepare(file_format=builders.ARRAY_RECORD)
    return b
  if name == 'image_folder':
    if not _get(config.data, 'folder', ''):
      raise ValueError("config.data.name='image_folder' needs config.data.folder: a folder of "
                       'images with same-stem .txt captions.')
    b = builders.folder_builder(config.data.folder, data_dir=data_dir)
    if not b.is_prepared():
      b.download_and_prepare(file_format=builders.ARRAY_RECORD)
    return b
  where = data_dir or tfds.core.constants.DATA_DIR
  try:
    b = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f'Dataset {name!r} (config.data.name) was not found: {e}. Use '
        "'captioned_shapes', 'image_folder' (with config.data.folder), or a TFDS dataset "
        f'prepared in config.data.data_dir ({where}).') from e
  if not b.is_prepared():
    raise ValueError(
        f'TFDS dataset {name!r} is not prepared in {where} (config.data.data_dir). Nothing is '
        'downloaded at run time: prepare it once, e.g. `tfds build '
        f'{name} --data_dir={where} --file_format=array_record`, or point '
        'config.data.data_dir at the folder that holds it.')
  return b


def _check_keys(builder, config):
  features = builder.info.features
  name = builder.info.name
  keys = _feature_keys(features)
  for field in ('image_key', 'caption_key'):
    key = config.data[field]
    if _split_feature(features, key) is None:
      raise KeyError(
          f'Dataset {name!r} has no feature {key!r} (config.data.{field}); its features are '
          f'{keys}. Set config.data.{field} to one of them.')


def open_source(config, split: str):
  """(data source, builder) for a split of config.data; images are left encoded."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = get_builder(config)
  _check_keys(builder, config)
  image_key = config.data.image_key
  decoders = None
  if isinstance(_split_feature(builder.info.features, image_key), tfds.features.Image):
    decoders = {}
    d = decoders
    parts = image_key.split('/')
    for p in parts[:-1]:
      d = d.setdefault(p, {})
    d[parts[-1]] = tfds.decode.SkipDecoding()
  try:
    src = builder.as_data_source(split, decoders=decoders)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f'Cannot read split {split!r} of dataset {builder.info.name!r} ({e}). Its splits are '
        f'{sorted(builder.info.splits.keys())}; set config.data.train_split / eval_split '
        "(slicing like 'train[:90%]' works). Data sources need file_format array_record.") from e
  if len(src) == 0:
    raise ValueError(f'Split {split!r} of dataset {builder.info.name!r} is empty.')
  return src, builder


# ---------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------


def _as_rgb_array(im: Image.Image) -> np.ndarray:
  from dalle2_jax.data import builders  # pylint: disable=g-import-not-at-top
  return np.asarray(builders._as_rgb(im))  # pylint: disable=protected-access


_PNG_RGB8_HEAD = b'\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR'


def _decode_unfiltered_png(data: bytes) -> np.ndarray | None:
  """Fast path for 8-bit RGB, non-interlaced PNGs whose rows all use filter 0 (as
  captioned_shapes writes them): one zlib call. None when the PNG is anything else."""
  if not data.startswith(_PNG_RGB8_HEAD):
    return None
  w, h = struct.unpack('>II', data[16:24])
  if data[24:29] != b'\x08\x02\x00\x00\x00':   # bit depth 8, RGB, no interlace
    return None
  pos, idat = 33, []
  while pos + 8 <= len(data):
    n = struct.unpack('>I', data[pos:pos + 4])[0]
    kind = data[pos + 4:pos + 8]
    if kind == b'IDAT':
      idat.append(data[pos + 8:pos + 8 + n])
    elif kind == b'IEND':
      break
    pos += 12 + n
  try:
    raw = zlib.decompress(b''.join(idat))
  except zlib.error:
    return None
  if len(raw) != h * (1 + 3 * w):
    return None
  rows = np.frombuffer(raw, np.uint8).reshape(h, 1 + 3 * w)
  if rows[:, 0].any():   # some row uses a PNG filter: let PIL do it
    return None
  return rows[:, 1:].reshape(h, w, 3)


def decode_image(value, image_size: int) -> np.ndarray:
  """Encoded bytes or an array -> uint8 [image_size, image_size, 3] RGB.

  Non-square images are centre-cropped to a square, then resized (bicubic, antialiased).
  Raises on undecodable bytes.
  """
  if isinstance(value, (bytes, np.bytes_)):
    arr = _decode_unfiltered_png(bytes(value))
    if arr is not None:
      if arr.shape[:2] == (image_size, image_size):
        return arr
      value = arr
  if isinstance(value, (bytes, np.bytes_)):
    with Image.open(io.BytesIO(value)) as im:
      im.load()
      if im.mode == 'RGB' and im.size == (image_size, image_size):
        return np.asarray(im)
      im = Image.fromarray(_as_rgb_array(im))
  else:
    arr = np.asarray(value)
    if arr.ndim == 2:
      arr = arr[..., None]
    if arr.shape[-1] == 1:
      arr = np.repeat(arr, 3, -1)
    elif arr.shape[-1] == 4:   # composite RGBA on black
      a = arr[..., 3:].astype(np.float32) / 255.0
      arr = (arr[..., :3].astype(np.float32) * a).round()
    arr = arr.astype(np.uint8)
    if arr.shape[:2] == (image_size, image_size):
      return arr
    im = Image.fromarray(arr)
  w, h = im.size
  if w != h:
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    im = im.crop((left, top, left + s, top + s))
  if im.size != (image_size, image_size):
    im = im.resize((image_size, image_size), Image.BICUBIC)
  return np.asarray(im)


def _get_path(example, key):
  v = example
  for part in key.split('/'):
    v = v[part]
  return v


def _to_str(x) -> str:
  if isinstance(x, (bytes, np.bytes_)):
    return bytes(x).decode('utf-8', errors='replace')
  return str(x)


def pick_caption(value, rng: np.random.Generator | None) -> str:
  """A caption from a text or a list of texts (random one if rng, else the first)."""
  if isinstance(value, (str, bytes, np.bytes_)):
    return _to_str(value)
  value = list(np.asarray(value, dtype=object).reshape(-1))
  if not value:
    return ''
  i = int(rng.integers(len(value))) if rng is not None else 0
  return _to_str(value[i])


class DecodedSource:
  """A random-access source of decoded records: {'image' uint8 [S, S, 3], 'caption' (raw:
  text or list of texts), 'valid', extra numeric keys}.

  Decoding happens here, in grain's reader threads (PIL releases the GIL while decoding), so
  several cores decode at once even with worker_count = 0. An undecodable image gives a
  record with valid=False (dropped by the pipeline) and a warning.

  cache: keep each decoded record in memory after its first read (config.data.
  cache_decoded), so later epochs neither read nor decode it; its arrays are read-only. With
  grain worker processes (worker_count > 0) each process keeps its own copy.
  """

  def __init__(self, source, image_key, caption_key, image_size, extra_keys=(),
               cache: bool = False):
    self.source = source
    self.image_key = image_key
    self.caption_key = caption_key
    self.image_size = image_size
    self.extra_keys = tuple(extra_keys)
    self.num_skipped = 0
    self._cache = {} if cache else None

  def __len__(self):
    return len(self.source)

  def __repr__(self):
    return (f'DecodedSource({self.source!r}, image_key={self.image_key!r}, '
            f'caption_key={self.caption_key!r}, image_size={self.image_size})')

  def __getitem__(self, index):
    if self._cache is None:
      return self._decode(index)
    record = self._cache.get(index)
    if record is None:
      record = self._decode(index)
      if not record['valid']:
        return record
      for v in record.values():
        if isinstance(v, np.ndarray):
          v.flags.writeable = False
      self._cache[index] = record
    return dict(record)   # the caller may replace keys (_PickCaption), not the cache's

  def _decode(self, index):
    element = self.source[index]
    out = {'caption': _get_path(element, self.caption_key)}
    try:
      out['image'] = decode_image(_get_path(element, self.image_key), self.image_size)
      out['valid'] = True
    except Exception as e:  # pylint: disable=broad-except
      self.num_skipped += 1
      logging.warning('Input pipeline: skipping record %d, its image cannot be decoded (%s); '
                      '%d skipped in this process so far.', index, e, self.num_skipped)
      out['image'] = np.zeros((self.image_size, self.image_size, 3), np.uint8)
      out['valid'] = False
    for k in self.extra_keys:
      out[k] = np.asarray(element[k])
    return out


class RepeatedSource:
  """A data source with some records repeated: record `table[i]` of `source` at index i."""

  def __init__(self, source, table: np.ndarray):
    self.source = source
    self.table = np.asarray(table, np.int64)

  def __len__(self):
    return len(self.table)

  def __repr__(self):
    return f'RepeatedSource({self.source!r}, {len(self.table)} of {len(self.source)})'

  def __getitem__(self, index):
    return self.source[int(self.table[index])]


def two_object_table(source, repeats: int, chunk: int = 4096) -> np.ndarray:
  """Record indices of a captioned_shapes source with each two-object record `repeats`
  times (oversamples the scenes with two objects, whose binding is hardest to learn)."""
  n = len(source)
  counts = []
  for start in range(0, n, chunk):
    indices = list(range(start, min(start + chunk, n)))
    records = (source.__getitems__(indices) if hasattr(source, '__getitems__')
               else [source[i] for i in indices])
    counts.extend(int(r['num_objects']) for r in records)
  reps = np.where(np.asarray(counts) == 2, int(repeats), 1)
  return np.repeat(np.arange(n), reps)


class _PickCaption(grain.RandomMapTransform):
  """One caption per record (a random one of a list, seeded per record and epoch)."""

  def random_map(self, element, rng: np.random.Generator):
    element = dict(element)
    element['caption'] = pick_caption(element['caption'], rng)
    return element


class _IsValid(grain.FilterTransform):

  def filter(self, element) -> bool:
    return bool(element['valid'])


class _FinishBatch(grain.MapTransform):
  """Batched uint8 images -> float32 in [-1, 1]; captions -> tokens."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer

  def map(self, batch):
    batch = dict(batch)
    batch.pop('valid', None)
    batch['image'] = batch['image'].astype(np.float32) * np.float32(2 / 255) - np.float32(1)
    batch['caption'] = [_to_str(c) for c in batch['caption']]
    batch['tokens'] = self.tokenizer(batch['caption'])
    return batch


# ---------------------------------------------------------------------------------------
# Iterator
# ---------------------------------------------------------------------------------------


def batch_sharding(mesh) -> NamedSharding:
  """Batch dimension over the ('data', 'fsdp') mesh axes (those the mesh has)."""
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  return NamedSharding(mesh, P(axes if axes else None))


def to_global(np_batch: Mapping[str, Any], mesh, global_batch_size: int) -> dict:
  """Per-process numpy batch -> global jax.Arrays (strings and non-arrays are dropped)."""
  sharding = batch_sharding(mesh)
  out = {}
  for k, v in np_batch.items():
    if not isinstance(v, np.ndarray) or v.dtype.kind not in 'biuf':
      continue
    out[k] = jax.make_array_from_process_local_data(
        sharding, v, (global_batch_size,) + v.shape[1:])
  return out


class InputIterator:
  """Iterator of global batches with `get_state` / `set_state` (JSON-serialisable)."""

  def __init__(self, loader: grain.DataLoader, decode: DecodedSource, mesh,
               global_batch_size: int, prepare: Callable[[dict], dict] | None,
               description: str):
    self._loader = loader
    self._iter = iter(loader)
    self._decode = decode
    self._mesh = mesh
    self.global_batch_size = global_batch_size
    self._prepare = prepare
    self.description = description

  def __iter__(self):
    return self

  def next_numpy(self) -> dict:
    """The next per-process numpy batch (after `prepare`), captions included."""
    batch = next(self._iter)
    if self._prepare is not None:
      batch = self._prepare(batch)
    return batch

  def __next__(self) -> dict:
    return to_global(self.next_numpy(), self._mesh, self.global_batch_size)

  @property
  def num_skipped(self) -> int:
    """Undecodable images skipped so far (in this process; exact when worker_count is 0)."""
    return self._decode.num_skipped

  def get_state(self) -> dict:
    state = self._iter.get_state()
    if isinstance(state, bytes):
      state = state.decode('utf-8')
    return {'grain': state, 'input': self.description}

  def set_state(self, state) -> None:
    if isinstance(state, str):
      state = json.loads(state)
    if state.get('input', self.description) != self.description:
      logging.warning('Restoring input state made for %s into %s.', state.get('input'),
                      self.description)
    grain_state = state['grain']
    if isinstance(grain_state, str):
      grain_state = grain_state.encode('utf-8')
    self._iter.set_state(grain_state)


def read_options(config) -> grain.ReadOptions:
  """Reader threads (decode records) and their prefetch buffer.

  config.data.read_threads (optional; 0 or absent = 2 per core, at most 16). The buffer is
  kept small (8 per thread): grain 0.2 scans the whole buffer for every element it returns,
  and its default of 500 costs more CPU than the decoding itself on a small machine.
  """
  threads = int(_get(config.data, 'read_threads', 0) or 0)
  if threads <= 0:
    threads = min(16, 2 * (os.cpu_count() or 1))
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=8 * threads)


def _mesh_batch_shards(mesh) -> int:
  n = 1
  for a in BATCH_AXES:
    if a in mesh.axis_names:
      n *= mesh.shape[a]
  return n


def make_input(config, split: str, *, global_batch_size: int, mesh, image_size=None,
               prepare: Callable[[dict], dict] | None = None, seed: int | None = None,
               shuffle: bool = True, num_epochs: int | None = None,
               extra_keys=None, two_object_repeats: int = 1) -> InputIterator:
  """An iterator of global batches for `split` of config.data.

  Args:
    config: the experiment config (uses config.data, config.tokenizer, config.seed).
    split: a split name (slicing allowed, e.g. 'train[:90%]').
    global_batch_size: examples per step over all processes.
    mesh: a jax.sharding.Mesh with axes ('data', 'fsdp'); the batch dim is sharded over both.
    image_size: square image size; None = config.data.image_size.
    prepare: host-side hook `np_batch -> np_batch`, applied per process before the global
      arrays are built (a task's `prepare_batch`).
    seed: shuffling / caption-choice seed; None = config.seed.
    shuffle: shuffle records (a new order every epoch).
    num_epochs: None = repeat forever.
    extra_keys: extra numeric features to carry into the batch; None = the structured
      attributes for captioned_shapes, () otherwise.
    two_object_repeats: captioned_shapes only: each two-object record appears this many
      times per epoch (1 = the stored mix, a quarter two-object; 3 = half).

  Returns:
    An `InputIterator`: next(it) -> {'image': f32 [B, H, W, 3], 'tokens': i32 [B, L], ...}.
  """
  image_size = int(image_size or config.data.image_size)
  seed = int(config.seed if seed is None else seed)
  n_proc, proc = jax.process_count(), jax.process_index()
  shards = _mesh_batch_shards(mesh)
  if global_batch_size % n_proc or global_batch_size % shards:
    raise ValueError(
        f'Global batch size {global_batch_size} must divide evenly over {n_proc} processes and '
        f'the {shards} devices of the mesh axes {BATCH_AXES}; change the stage batch_size.')
  per_process = global_batch_size // n_proc
  src, builder = open_source(config, split)
  if extra_keys is None:
    extra_keys = SHAPES_ATTRIBUTES if config.data.name == 'captioned_shapes' else ()
  decoded = DecodedSource(src, config.data.image_key, config.data.caption_key, image_size,
                          extra_keys, cache=bool(_get(config.data, 'cache_decoded', False)))
  records = decoded   # what the sampler indexes
  two_object_repeats = int(two_object_repeats)
  if two_object_repeats != 1:
    if two_object_repeats < 1 or config.data.name != 'captioned_shapes':
      raise ValueError(f'two_object_repeats={two_object_repeats}: needs an integer >= 1 and '
                       f'captioned_shapes data (config.data.name={config.data.name!r}); '
                       'set the stage\'s two_object_repeats to 1.')
    records = RepeatedSource(decoded, two_object_table(src, two_object_repeats))
  tok = tokenizer_lib.Tokenizer.from_config(config)
  shard_options = grain.ShardOptions(shard_index=proc, shard_count=n_proc, drop_remainder=True)
  if len(records) // n_proc < per_process:
    logging.warning('Split %r has %d records for %d processes: fewer than one batch of %d '
                    'per process (batches span epochs).', split, len(records), n_proc,
                    per_process)
  sampler = grain.IndexSampler(num_records=len(records), shard_options=shard_options,
                               shuffle=shuffle, num_epochs=num_epochs, seed=seed)
  ops = [_PickCaption(), _IsValid(), grain.Batch(per_process, drop_remainder=True),
         _FinishBatch(tok)]
  worker_count = int(_get(config.data, 'worker_count', 0) or 0)
  loader = grain.DataLoader(data_source=records, sampler=sampler, operations=ops,
                            worker_count=worker_count, shard_options=shard_options,
                            read_options=read_options(config))
  description = (f'{builder.info.name}/{builder.builder_config.name if builder.builder_config else ""}'
                 f':{split} seed={seed} batch={global_batch_size} size={image_size}'
                 + (f' two_object_repeats={two_object_repeats}' if two_object_repeats != 1
                    else ''))
  return InputIterator(loader, decoded, mesh, global_batch_size, prepare, description)


def load_examples(config, split: str, num: int, image_size=None) -> dict:
  """The first `num` records of a split in stored order, as numpy (host side, no shuffling).

  Returns 'image' uint8 [N, S, S, 3] (S = image_size or config.data.image_size), 'caption'
  list[str] (the first caption when there are several), 'index' [N] (record numbers), and
  for captioned_shapes its attributes 'objects' [N, 2, 5], 'num_objects', 'relation',
  'names' [N, 4]. Undecodable images are skipped with a warning (then 'index' has gaps).
  """
  image_size = int(image_size or config.data.image_size)
  src, _ = open_source(config, split)
  num = min(int(num), len(src))
  extra = SHAPES_ATTRIBUTES if config.data.name == 'captioned_shapes' else ()
  images, captions, index, attrs = [], [], [], {k: [] for k in extra}
  for i in range(num):
    ex = src[i]
    try:
      img = decode_image(_get_path(ex, config.data.image_key), image_size)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('load_examples: skipping record %d of %r (%s).', i, split, e)
      continue
    images.append(img)
    index.append(i)
    captions.append(pick_caption(_get_path(ex, config.data.caption_key), None))
    for k in extra:
      attrs[k].append(np.asarray(ex[k]))
  out = {'image': (np.stack(images) if images else
                   np.zeros((0, image_size, image_size, 3), np.uint8)),
         'caption': captions, 'index': np.asarray(index, np.int64)}
  for k, v in attrs.items():
    out[k] = np.stack(v) if v else np.zeros((0,))
  return out
