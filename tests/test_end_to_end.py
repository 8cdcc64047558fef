"""The whole system through its real entry points, on a shrunken configs/tiny.py:

  python train.py --config configs/tiny.py --workdir W     (clip, prior, decoder, upsampler)
  python sample.py --workdir W --prompt ...
  python -m dalle2_jax.evaluate --workdir W

Two steps per stage: it checks that the stages hand over to each other (exports, configs,
the frozen CLIP) and that sampling and evaluation read a trained run; it does not check
quality (the shapes default and its README numbers do).
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Smaller than configs/tiny.py so that four stages train in CI time.
OVERRIDES = [
    '--config.clip.steps=2', '--config.prior.steps=2', '--config.decoder.steps=2',
    '--config.upsampler.steps=2',
    '--config.clip.image_size=16', '--config.clip.model.vision.patch_size=8',
    '--config.prior.image_size=16',
    '--config.decoder.image_size=16', '--config.decoder.model.channels=8',
    '--config.decoder.model.channel_mult=(1,)',
    '--config.upsampler.low_res=16', '--config.upsampler.high_res=32',
    '--config.upsampler.model.channels=8', '--config.upsampler.model.channel_mult=(1,)',
    '--config.data.shapes.num_train=64', '--config.data.shapes.num_test=16',
    '--config.data.shapes.num_heldout=16',
]


def _run(args, timeout=900):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'   # a small real mesh
  proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)
  assert proc.returncode == 0, f'{args[:3]} failed:\n{proc.stderr[-4000:]}'
  return proc


@pytest.mark.slow
def test_train_sample_evaluate(tmp_path):
  # A relative workdir, as the README writes it (orbax itself only takes absolute paths).
  workdir = os.path.relpath(tmp_path / 'run', REPO)
  data_dir = str(tmp_path / 'tfds')
  proc = _run(['train.py', '--config', 'configs/tiny.py', '--workdir', workdir,
               f'--config.data.data_dir={data_dir}', *OVERRIDES])
  assert re.search(r'Trained in [\d.]+ min: clip [\d.]+ min, prior [\d.]+ min, '
                   r'decoder [\d.]+ min, upsampler [\d.]+ min\.', proc.stderr), proc.stderr[-2000:]
  for stage in ('clip', 'prior', 'decoder', 'upsampler'):
    assert os.path.exists(os.path.join(REPO, workdir, stage, 'export', 'params.safetensors')), stage

  out = str(tmp_path / 'samples')
  proc = _run(['sample.py', '--workdir', workdir, '--prompt',
               'a large red circle in the top left', '--prompt', 'a small blue square',
               '--num_images_per_prompt', '2', '--prior_steps', '2', '--decoder_steps', '2',
               '--upsampler_steps', '2', '--outdir', out])
  assert 'sampled 4/4 images' in proc.stdout
  assert sorted(os.listdir(out)) == [f'{i:04d}.png' for i in range(4)] + [
      'grid.png', 'samples.jsonl']
  images = np.stack([np.asarray(Image.open(os.path.join(out, f'{i:04d}.png')))
                     for i in range(4)])
  assert images.shape == (4, 32, 32, 3)
  assert images.std() > 0
  records = [json.loads(l) for l in open(os.path.join(out, 'samples.jsonl'))]
  assert [r['prompt'] for r in records] == ['a large red circle in the top left'] * 2 + [
      'a small blue square'] * 2

  report_file = str(tmp_path / 'eval.json')
  proc = _run(['-m', 'dalle2_jax.evaluate', '--workdir', workdir, '--num_prompts', '1',
               '--prior_steps', '2', '--decoder_steps', '2', '--upsampler_steps', '2',
               '--prior_guidance_scale', '2.5', '--decoder_sampler', 'ddpm', '--out',
               report_file])
  report = json.loads(proc.stdout)   # stdout carries only the report
  assert json.load(open(report_file)) == report
  assert report['settings']['prior']['guidance_scale'] == 2.5
  assert report['settings']['decoder']['sampler'] == 'ddpm'
  assert report['accuracy']['heldout']['all']['n'] == 3
  assert set(report['summary']['meets_targets']) == {
      'seen_overall', 'heldout_overall', 'two_object_overall'}
  assert np.isfinite(report['fd']['clip_image_embed_fd'])
  assert report['fd']['num_real'] == 3
