"""sample.py through its real entry point: output files, their order, the jsonl, and
argument errors that come before anything compiles."""

import json
import os
import subprocess
import sys
import time

import numpy as np
from PIL import Image
import pytest

import sampling_testutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sample(*args, timeout=300):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  t0 = time.time()
  proc = subprocess.run([sys.executable, os.path.join(REPO, 'sample.py'), *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=timeout)
  return proc, time.time() - t0


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  return sampling_testutil.make_workdir(str(tmp_path_factory.mktemp('cli')))


def test_writes_images_grid_and_jsonl_in_prompt_order(workdir, tmp_path):
  prompts_file = tmp_path / 'prompts.txt'
  prompts_file.write_text('a small blue square\n\na green triangle at the bottom\n')
  out = tmp_path / 'out'
  proc, _ = _sample('--workdir', workdir, '--prompt', 'a large red circle in the top left',
                    '--prompts_file', str(prompts_file), '--num_images_per_prompt', '2',
                    '--seed', '7', '--outdir', str(out))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'sampled 6/6 images' in proc.stdout   # progress
  names = sorted(os.listdir(out))
  assert names == [f'{i:04d}.png' for i in range(6)] + ['grid.png', 'samples.jsonl']
  images = [np.asarray(Image.open(out / f'{i:04d}.png')) for i in range(6)]
  assert all(im.shape == (32, 32, 3) and im.dtype == np.uint8 for im in images)
  grid = np.asarray(Image.open(out / 'grid.png'))
  assert grid.shape == (3 * 34 + 2, 2 * 34 + 2, 3)   # a row per prompt
  np.testing.assert_array_equal(grid[2 + 34:2 + 34 + 32, 2 + 34:2 + 34 + 32], images[3])
  records = [json.loads(line) for line in (out / 'samples.jsonl').read_text().splitlines()]
  expected = ['a large red circle in the top left'] * 2 + ['a small blue square'] * 2 + [
      'a green triangle at the bottom'] * 2
  assert [r['prompt'] for r in records] == expected
  assert [r['file'] for r in records] == [f'{i:04d}.png' for i in range(6)]
  assert [r['index'] for r in records] == list(range(6))
  assert all(r['seed'] == 7 for r in records)
  assert records[0]['settings']['decoder']['steps'] == 2
  assert records[0]['settings']['prior']['num_candidates'] == 2
  assert records[0]['attention_impl'] == {'prior': 'xla', 'decoder': 'xla'}


@pytest.mark.parametrize('args, message', [
    (['--decoder_steps', '0'], 'decoder_steps'),
    (['--prior_guidance_scale', '-1'], 'prior_guidance_scale'),
    (['--decoder_sampler', 'euler'], 'decoder_sampler'),
    (['--upsampler_steps', '3,x'], 'upsampler_steps'),
    (['--num_images_per_prompt', '0'], 'num_images_per_prompt'),
    (['--decoder_guidance_interval', '600'], 'decoder_guidance_interval'),
    (['--decoder_image_embed_guidance_scale', '-1'], 'decoder_image_embed_guidance_scale'),
    (['--attention_impl', 'flash'], 'attention_impl'),
    (['--attention_impl', 'cudnn'], "--attention_impl='cudnn' runs on NVIDIA GPUs only"),
])
def test_flag_errors(workdir, args, message):
  proc, seconds = _sample('--workdir', workdir, '--prompt', 'a red circle', *args)
  assert proc.returncode != 0
  assert message in proc.stderr
  assert 'Traceback' not in proc.stderr


def test_errors_after_loading_but_before_compiling(workdir, tmp_path):
  # More steps than the stage's diffusion has: checked against the loaded config.
  proc, _ = _sample('--workdir', workdir, '--prompt', 'x', '--decoder_steps', '5000')
  assert proc.returncode != 0 and 'decoder: steps=5000' in proc.stderr
  assert 'sampled' not in proc.stdout
  # A missing stage names the stage and the command that trains it.
  proc, _ = _sample('--workdir', str(tmp_path / 'nothing'), '--prompt', 'x')
  assert proc.returncode == 2 and 'train.py' in proc.stderr
  # An unreadable input image names the file.
  bad = tmp_path / 'broken.png'
  bad.write_bytes(b'definitely not a png')
  proc, _ = _sample('--workdir', workdir, '--mode', 'variations', '--image', str(bad))
  assert proc.returncode == 2 and 'broken.png' in proc.stderr
  assert 'Traceback' not in proc.stderr
  # Mode inputs.
  proc, _ = _sample('--workdir', workdir, '--mode', 'interpolate', '--prompt', 'x')
  assert proc.returncode != 0 and 'exactly two' in proc.stderr
  proc, _ = _sample('--workdir', workdir)
  assert proc.returncode != 0 and '--prompt' in proc.stderr
