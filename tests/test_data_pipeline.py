"""Input pipeline: 1 vs 8 devices, save/restore, coco-like TFDS data, image folders, errors."""

import io
import json
import os
import sys

import jax
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from dalle2_jax.data import builders
from dalle2_jax.data import pipeline

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from configs import coco64  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from configs import tiny  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def _mesh(n, shape):
  return jax.sharding.Mesh(np.array(jax.devices()[:n]).reshape(shape), ('data', 'fsdp'))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def _shapes_config(data_dir, **shapes):
  c = tiny.get_config()
  c.unlock()
  c.data.data_dir = data_dir
  c.data.shapes.update(dict(seed=0, num_train=40, num_test=16, num_heldout=16), **shapes)
  return c


def _np(batch):
  return {k: np.asarray(v) for k, v in batch.items()}


def test_same_global_batches_on_1_and_8_devices(data_dir):
  config = _shapes_config(data_dir)
  runs = {}
  for n, shape in ((1, (1, 1)), (8, (8, 1)), (8, (4, 2))):
    mesh = _mesh(n, shape)
    it = pipeline.make_input(config, 'train', global_batch_size=16, mesh=mesh)
    batches = [next(it) for _ in range(3)]
    b = batches[0]
    assert b['image'].shape == (16, 64, 64, 3) and b['image'].dtype == np.float32
    assert b['tokens'].shape == (16, 32) and b['tokens'].dtype == np.int32
    assert 'caption' not in b
    for v in b.values():
      assert v.sharding.spec[0] == ('data', 'fsdp')
      assert len(v.addressable_shards) == n and v.addressable_shards[0].data.shape[0] == 16 // n
    runs[shape] = [_np(x) for x in batches]
  ref = runs[(1, 1)]
  for shape, got in runs.items():
    for a, b in zip(ref, got):
      assert a.keys() == b.keys()
      for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f'{shape} {k}')
  img = ref[0]['image']
  assert img.min() == -1.0 and img.max() <= 1.0
  assert (ref[0]['tokens'][:, 0] == 49406).all()
  # Batches differ from step to step, and a different seed gives a different order.
  assert not np.array_equal(ref[0]['image'], ref[1]['image'])
  other = pipeline.make_input(config, 'train', global_batch_size=16, mesh=_mesh(1, (1, 1)),
                              seed=1)
  assert not np.array_equal(np.asarray(next(other)['image']), ref[0]['image'])


def test_save_restore_resumes_exactly(data_dir):
  config = _shapes_config(data_dir)
  mesh = _mesh(8, (4, 2))
  make = lambda: pipeline.make_input(config, 'train', global_batch_size=16, mesh=mesh,
                                     image_size=32)
  it = make()
  straight = [_np(next(it)) for _ in range(6)]   # 40 records: crosses epochs
  it = make()
  for _ in range(2):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  resumed = make()
  resumed.set_state(state)
  for want in straight[2:]:
    got = _np(next(resumed))
    for k in want:
      np.testing.assert_array_equal(want[k], got[k])
  assert straight[0]['image'].shape == (16, 32, 32, 3)
  # Another seed is another data order: its iterator refuses the state (the training loop
  # turns this into an error naming config.seed).
  other = pipeline.make_input(config, 'train', global_batch_size=16, mesh=mesh,
                              image_size=32, seed=1)
  with pytest.raises(ValueError):
    other.set_state(state)


def test_prepare_hook_and_unshuffled_eval(data_dir):
  config = _shapes_config(data_dir)

  def prepare(b):
    b = dict(b)
    b['low_res'] = b['image'][:, ::2, ::2]
    b['n_chars'] = np.array([len(c) for c in b['caption']], np.int32)
    return b

  it = pipeline.make_input(config, 'test', global_batch_size=8, mesh=_mesh(8, (8, 1)),
                           prepare=prepare, shuffle=False)
  b = next(it)
  assert b['low_res'].shape == (8, 32, 32, 3) and b['n_chars'].shape == (8,)
  ex = pipeline.load_examples(config, 'test', 8)
  np.testing.assert_array_equal(
      np.asarray(b['image']), ex['image'].astype(np.float32) * np.float32(2 / 255) - 1)
  np.testing.assert_array_equal(np.asarray(b['n_chars']), [len(c) for c in ex['caption']])
  np.testing.assert_array_equal(np.asarray(b['objects']), ex['objects'])
  assert ex['image'].dtype == np.uint8 and ex['objects'].shape == (8, 2, 5)


def test_two_object_repeats_oversamples_two_object_scenes(data_dir):
  config = _shapes_config(data_dir)
  mesh = _mesh(1, (1, 1))
  stored = pipeline.load_examples(config, 'train', 40, image_size=32)
  two = stored['num_objects'] == 2
  assert 0 < two.sum() < 40
  it = pipeline.make_input(config, 'train', global_batch_size=8, mesh=mesh, image_size=32,
                           num_epochs=1, two_object_repeats=3)
  seen = {}
  for b in it:
    for img, n in zip(np.asarray(b['image']), np.asarray(b['num_objects'])):
      key = img.tobytes()
      seen.setdefault(key, [n, 0])[1] += 1
  # One epoch: every single-object record once, every two-object record three times
  # (drop_remainder may cut the last few).
  total = int((~two).sum() + 3 * two.sum())
  assert total - 8 < sum(c for _, c in seen.values()) <= total
  assert len(seen) >= 40 - 8
  counts = np.array([c for n, c in seen.values() if n == 2])
  assert (counts <= 3).all() and (counts == 3).sum() >= two.sum() - 3
  assert all(c == 1 for n, c in seen.values() if n == 1)
  with pytest.raises(ValueError, match='two_object_repeats'):
    pipeline.make_input(config, 'train', global_batch_size=8, mesh=mesh, two_object_repeats=0)


def test_cache_decoded_gives_the_same_batches_and_reads_each_record_once(data_dir,
                                                                        monkeypatch):
  mesh = _mesh(2, (2, 1))
  calls = []
  decode = pipeline.decode_image
  monkeypatch.setattr(pipeline, 'decode_image', lambda *a: calls.append(1) or decode(*a))
  runs, reads = {}, {}
  for cache in (False, True):
    config = _shapes_config(data_dir)
    config.data.cache_decoded = cache
    it = pipeline.make_input(config, 'train', global_batch_size=8, mesh=mesh, image_size=32,
                             two_object_repeats=3)
    calls.clear()
    runs[cache] = [_np(next(it)) for _ in range(24)]   # 192 examples: over 3 epochs
    read = len(calls)
    runs[cache] += [_np(next(it)) for _ in range(8)]
    reads[cache] = (read, len(calls))
  assert reads[False][0] >= 24 * 8          # every example read and decoded
  # Each of the 40 records once (reader threads may race to the same one), then none.
  assert reads[True][0] < 56 and reads[True][1] == reads[True][0]
  for a, b in zip(runs[False], runs[True]):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])

  # Cached arrays cannot be changed through a returned record, nor the record through a copy.
  config = _shapes_config(data_dir)
  src, _ = pipeline.open_source(config, 'train')
  decoded = pipeline.DecodedSource(src, 'image', 'caption', 32, pipeline.SHAPES_ATTRIBUTES,
                                   cache=True)
  first = decoded[3]
  first['caption'] = 'changed'
  assert decoded[3]['caption'] != 'changed'
  with pytest.raises(ValueError, match='read-only'):
    decoded[3]['image'][0, 0, 0] = 1


# --- a coco_captions-like TFDS dataset --------------------------------------------------


def _jpeg(arr, fmt='JPEG', mode=None):
  buf = io.BytesIO()
  im = Image.fromarray(arr)
  if mode:
    im = im.convert(mode)
  im.save(buf, format=fmt)
  return buf.getvalue()


class FakeCocoCaptions(builders._LocalBuilder):  # pylint: disable=protected-access
  """coco_captions' feature layout: image, image/id, captions: Sequence({id, text})."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
        'image/id': tfds.features.Scalar(np.int64),
        'captions': tfds.features.Sequence({'id': tfds.features.Scalar(np.int64),
                                            'text': tfds.features.Text()}),
    }))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(0, 24), 'restval': self._generate_examples(100, 8),
            'val': self._generate_examples(200, 8)}

  def _generate_examples(self, start, n):  # pylint: disable=arguments-differ
    rng = np.random.default_rng(start)
    for i in range(start, start + n):
      arr = rng.integers(0, 255, size=(48 + 8 * (i % 3), 64, 3), dtype=np.uint8)
      data = _jpeg(arr, 'PNG', 'L') if i % 4 == 1 else _jpeg(arr)   # some grayscale
      if i == 205:
        data = data[:300]   # one truncated JPEG in 'val'
      yield i, {'image': data, 'image/id': i,
                'captions': [{'id': 10 * i + j, 'text': f'caption {j} of image {i}'}
                             for j in range(5)]}


def test_coco64_config_on_coco_like_standin(data_dir):
  FakeCocoCaptions(data_dir=data_dir, file_format='array_record').download_and_prepare(
      file_format='array_record')
  config = coco64.get_config()
  config.unlock()
  config.data.update(name='fake_coco_captions', data_dir=data_dir, worker_count=0)
  mesh = _mesh(8, (8, 1))
  it = pipeline.make_input(config, config.data.train_split, global_batch_size=8, mesh=mesh)
  assert config.data.train_split == 'train+restval'
  seen = []
  for _ in range(8):   # 32 records: two epochs
    b = it.next_numpy()
    assert b['image'].shape == (8, 64, 64, 3) and b['tokens'].shape == (8, 77)
    seen += b['caption']
  assert all(c.startswith('caption ') for c in seen)
  chosen = {}
  for c in seen:
    chosen.setdefault(c.split(' of ')[1], set()).add(c.split()[1])
  assert len(chosen) == 32   # every image of train+restval
  assert any(len(v) > 1 for v in chosen.values())   # captions vary across epochs
  again = pipeline.make_input(config, config.data.train_split, global_batch_size=8, mesh=mesh)
  assert again.next_numpy()['caption'] == seen[:8]   # ... deterministically
  val = pipeline.make_input(config, 'val', global_batch_size=8, mesh=mesh)
  g = next(val)   # 7 good records of 8: the bad one is skipped, the batch runs into epoch 2
  assert g['image'].shape == (8, 64, 64, 3) and g['tokens'].shape == (8, 77)
  assert val.num_skipped >= 1   # counted when read (reader threads read ahead)
  ex = pipeline.load_examples(config, 'val', 8)
  assert len(ex['caption']) == 7 and len(ex['index']) == 7
  # Stored order (TFDS shuffled it at build time), first of the five captions.
  assert all(c.startswith('caption 0 of image 20') for c in ex['caption'])
  assert ex['image'].shape == (7, 64, 64, 3)


# --- image folder -----------------------------------------------------------------------


def test_image_folder_skips_corrupt_files(tmp_path, data_dir, caplog):
  folder = tmp_path / 'imgs'
  (folder / '00000').mkdir(parents=True)
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 255, size=(40, 50, 3), dtype=np.uint8)
  good = {
      '00000/a.jpg': (_jpeg(rgb), 'a noisy picture'),
      '00000/b.png': (_jpeg(rgb, 'PNG', 'L'), 'grayscale'),
      'c.png': (_jpeg(np.dstack([rgb, rgb[..., :1]]), 'PNG'), ''),          # RGBA, empty caption
      'd.png': (_jpeg(rgb, 'PNG', 'P'), None),                                # palette, no .txt
  }
  for name, (data, cap) in good.items():
    (folder / name).write_bytes(data)
    if cap is not None:
      (folder / name).with_suffix('.txt').write_text(cap)
  (folder / 'e.jpg').write_bytes(_jpeg(rgb)[:200])         # truncated
  (folder / 'f.jpg').write_bytes(b'not an image at all')   # garbage
  (folder / 'f.txt').write_text('never seen')
  config = tiny.get_config()
  config.unlock()
  config.data.update(name='image_folder', folder=str(folder), data_dir=data_dir)
  with caplog.at_level('WARNING'):
    it = pipeline.make_input(config, 'train', global_batch_size=4, mesh=_mesh(4, (2, 2)),
                             image_size=32, shuffle=False)
    b = it.next_numpy()
  # Only this folder's warnings: a previous test's input pipeline in the same process may
  # still be decoding (grain reader threads) and log its own skips meanwhile.
  assert sum('skipping' in r.getMessage() and str(folder) in r.getMessage()
             for r in caplog.records) == 2
  assert b['image'].shape == (4, 32, 32, 3)
  assert sorted(b['caption']) == sorted(['a noisy picture', 'grayscale', '', ''])
  builder = pipeline.get_builder(config)
  assert builder.info.splits['train'].num_examples == 4
  assert builder.info.metadata['num_skipped'] == 2
  ex = pipeline.load_examples(config, 'train', 10)
  assert ex['image'].shape == (4, 64, 64, 3) and ex['image'].dtype == np.uint8
  np.testing.assert_array_equal(ex['index'], [0, 1, 2, 3])
  # RGBA composited on black, grayscale replicated to three channels.
  names = [os.path.basename(p) for p, _ in builder.builder_config.pairs]
  assert 'e.jpg' in names and 'f.jpg' in names


def test_decode_image_conversions():
  rgb = np.random.default_rng(1).integers(0, 255, size=(20, 30, 3), dtype=np.uint8)
  gray = pipeline.decode_image(_jpeg(rgb, 'PNG', 'L'), 16)
  assert gray.shape == (16, 16, 3) and (gray[..., 0] == gray[..., 2]).all()
  rgba = np.dstack([rgb, np.zeros_like(rgb[..., :1])])   # fully transparent -> black
  assert not pipeline.decode_image(_jpeg(rgba, 'PNG'), 8).any()
  assert pipeline.decode_image(_jpeg(rgb, 'PNG', 'P'), 30).shape == (30, 30, 3)
  same = pipeline.decode_image(_jpeg(rgb[:20, :20], 'PNG'), 20)
  np.testing.assert_array_equal(same, rgb[:20, :20])
  with pytest.raises(Exception):
    pipeline.decode_image(b'garbage', 8)


# --- errors ---------------------------------------------------------------------------


def test_bad_config_fails_at_start_with_a_useful_message(data_dir, tmp_path):
  mesh = _mesh(1, (1, 1))
  config = _shapes_config(data_dir)
  config.data.image_key = 'img'
  with pytest.raises(KeyError) as e:
    pipeline.make_input(config, 'train', global_batch_size=8, mesh=mesh)
  msg = str(e.value)
  assert 'captioned_shapes' in msg and "'img'" in msg and 'config.data.image_key' in msg
  assert "'caption'" in msg and "'image'" in msg   # the keys it has
  config = _shapes_config(data_dir)
  config.data.name = 'no_such_dataset_xyz'
  with pytest.raises(ValueError, match=r'no_such_dataset_xyz.*config\.data\.name'):
    pipeline.make_input(config, 'train', global_batch_size=8, mesh=mesh)
  config = _shapes_config(data_dir)
  with pytest.raises(ValueError, match=r"'validation'.*heldout.*config\.data\.train_split"):
    pipeline.make_input(config, 'validation', global_batch_size=8, mesh=mesh)
  with pytest.raises(ValueError, match='batch_size'):
    pipeline.make_input(config, 'train', global_batch_size=12, mesh=_mesh(8, (8, 1)))
  config.data.name = 'image_folder'
  config.data.folder = str(tmp_path / 'nothing_here')
  with pytest.raises(FileNotFoundError, match='config.data.folder'):
    pipeline.make_input(config, 'train', global_batch_size=8, mesh=mesh)
