"""dalle2_jax.evaluate: the report's wiring, checked with an oracle sampler that draws the
ground truth (accuracy 1) or blank canvases (accuracy 0). The command itself runs on a trained
run in tests/test_end_to_end.py."""

import json

import numpy as np
import pytest

import sampling_testutil
from dalle2_jax import evaluate
from dalle2_jax import sampling
from dalle2_jax.data import captioned_shapes


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  return sampling_testutil.make_workdir(str(tmp_path_factory.mktemp('eval')))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='module')
def unclip(workdir, data_dir):
  u = sampling.UnCLIP.from_workdir(workdir)
  with u.config.unlocked():
    u.config.data.data_dir = data_dir
  return u


class Oracle:
  """Draws each evaluation prompt's ground-truth rendering (or a blank canvas)."""

  def __init__(self, unclip, num_prompts, prompt_seed, blank=False):
    self._unclip = unclip
    self.truth = {}
    for kind in evaluate.KINDS:
      p = captioned_shapes.eval_prompts(kind, num_prompts, prompt_seed)
      self.truth.update(zip(p['caption'], p['image']))
    self.blank = blank
    self.config = unclip.config
    self.stage_names = unclip.stage_names
    self.default_settings = unclip.default_settings
    self.validate = unclip.validate
    self.encode_image = unclip.encode_image
    self.encode_text = unclip.encode_text

  def __call__(self, prompts, **kw):
    del kw
    images = np.stack([self.truth[p] for p in prompts])
    return np.zeros_like(images) if self.blank else images

  def decode(self, image_embeds, prompts, **kw):
    """Checks that it was given the CLIP embeddings of the prompts' true renderings."""
    del kw
    images = np.stack([self.truth[p] for p in prompts])
    np.testing.assert_allclose(image_embeds, self.encode_image(images), rtol=1e-5, atol=1e-5)
    return images


def test_oracle_scores_perfectly_and_blank_scores_zero(unclip):
  report = evaluate.evaluate(Oracle(unclip, 4, 1234), num_prompts=4, num_real=16)
  s = report['summary']
  assert s['seen_overall'] == s['heldout_overall'] == s['two_object_overall'] == 1.0
  assert all(s['meets_targets'].values())
  for kind in evaluate.KINDS:
    for style in evaluate.STYLES + ('all',):
      assert report['accuracy'][kind][style]['overall'] == 1.0
  assert report['accuracy']['test']['two']['relation'] == 1.0
  assert report['accuracy']['test']['all']['n'] == 12
  assert report['fd']['num_generated'] == 12 and report['fd']['num_real'] == 16
  assert report['fd']['clip_image_embed_fd'] >= 0
  for kind in evaluate.KINDS:
    assert report['two_object_outcomes'][kind]['n'] == 4
    assert report['two_object_outcomes'][kind]['right'] == 1.0
  np.testing.assert_allclose(report['clip_score']['test']['generated'],
                             report['clip_score']['test']['ground_truth'], rtol=1e-5)
  json.dumps(report)   # JSON-able

  blank = evaluate.evaluate(Oracle(unclip, 4, 1234, blank=True), num_prompts=4, num_real=16)
  assert blank['summary']['seen_overall'] == 0.0
  assert not any(blank['summary']['meets_targets'].values())
  assert blank['two_object_outcomes']['test']['missing'] == 1.0
  assert blank['fd']['clip_image_embed_fd'] > report['fd']['clip_image_embed_fd']


def test_ground_truth_image_embeds_decode_the_true_renderings(unclip):
  class DecoderOnly(Oracle):
    def __call__(self, prompts, **kw):
      raise AssertionError('the whole chain ran')
  oracle = DecoderOnly(unclip, 3, 1234)
  report = evaluate.evaluate(oracle, num_prompts=3, num_real=8, image_embeds='ground_truth')
  assert report['image_embeds'] == 'ground_truth'
  assert report['summary']['seen_overall'] == report['summary']['heldout_overall'] == 1.0
  with pytest.raises(ValueError, match='image_embeds'):
    evaluate.evaluate(oracle, num_prompts=1, image_embeds='text')


class Decodes(Oracle):
  """Decodes the true rendering where keep(sample index) holds, a blank canvas elsewhere."""

  def __init__(self, unclip, num_prompts, prompt_seed, keep):
    super().__init__(unclip, num_prompts, prompt_seed)
    self.keep = keep

  def decode(self, image_embeds, prompts, **kw):
    images = super().decode(image_embeds, prompts, **kw)
    images[[not self.keep(i) for i in range(len(images))]] = 0
    return images


def test_candidates_scores_each_decoder_sample(unclip):
  report = evaluate.candidates(Decodes(unclip, 3, 1234, lambda i: i % 2 == 0),
                               num_candidates=4, num_prompts=3, image_embeds='ground_truth')
  assert report['settings']['decoder']['num_candidates'] == 1
  for kind in evaluate.KINDS:
    r = report[kind]
    assert r['n'] == 3
    assert r['per_candidate'] == 0.5 and r['any_right'] == 1.0
    assert r['outcomes']['all']['n'] == 12
    assert r['outcomes']['all']['right'] == r['outcomes']['all']['missing'] == 0.5
    assert r['outcomes']['clip_reranked']['n'] == 3
  json.dumps(report)

  # One right sample in four (the last of each prompt's): any_right sees it.
  report = evaluate.candidates(Decodes(unclip, 3, 1234, lambda i: i % 4 == 3),
                               num_candidates=4, num_prompts=3, style='full',
                               image_embeds='ground_truth')
  for kind in evaluate.KINDS:
    assert report[kind]['per_candidate'] == 0.25 and report[kind]['any_right'] == 1.0
    assert 'outcomes' not in report[kind]
  for keep, expected in ((lambda i: True, 1.0), (lambda i: False, 0.0)):
    report = evaluate.candidates(Decodes(unclip, 3, 1234, keep), num_candidates=2,
                                 num_prompts=3, style='partial', image_embeds='ground_truth')
    for kind in evaluate.KINDS:
      assert report[kind]['per_candidate'] == report[kind]['any_right'] == expected
      assert report[kind]['clip_reranked'] == expected
  with pytest.raises(ValueError, match='style'):
    evaluate.candidates(unclip, style='three')
