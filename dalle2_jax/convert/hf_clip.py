r"""Imports a Hugging Face CLIP checkpoint (a directory on disk) as a frozen CLIP export.

  python -m dalle2_jax.convert.hf_clip --src /path/to/clip-vit-base-patch32 --out runs/hf_clip

The source directory holds `config.json` (a `CLIPModel` config) and `model.safetensors`
(read with safetensors' numpy API; no torch). The output is an export directory
(`dalle2_jax.training.export` format) that the prior and decoder stages take as their frozen
CLIP (`prior.clip_checkpoint` / `decoder.clip_checkpoint`), and `clip.FrozenClip.load` reads.
If the source directory also holds the tokenizer files (vocab.json + merges.txt), the
exported config's `tokenizer.path` points at it.

Library use:
  config, params = hf_clip.convert(src_dir)   # params: nested dicts of float32 numpy
"""

from __future__ import annotations

import json
import os
from typing import Callable

from absl import app
from absl import flags
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from safetensors import numpy as st_numpy

from dalle2_jax.models import clip

ACTIVATIONS = {'quick_gelu': 'quick_gelu', 'gelu': 'gelu', 'gelu_new': 'gelu_tanh',
               'gelu_pytorch_tanh': 'gelu_tanh', 'gelu_fast': 'gelu_tanh', 'relu': 'relu'}
# Buffers some checkpoints store that carry no weights.
IGNORED_KEYS = ('text_model.embeddings.position_ids', 'vision_model.embeddings.position_ids')
TEXT_KEYS = ('hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads',
             'max_position_embeddings', 'vocab_size')
VISION_KEYS = ('hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads',
               'image_size', 'patch_size')


class NotAClipError(ValueError):
  """The source directory is not a Hugging Face CLIPModel checkpoint."""


def _activation(name: str, where: str) -> str:
  if name not in ACTIVATIONS:
    raise NotAClipError(f'{where}.hidden_act={name!r} is not supported '
                        f'(supported: {sorted(ACTIVATIONS)}).')
  return ACTIVATIONS[name]


def read_hf_config(src: str) -> dict:
  path = os.path.join(src, 'config.json')
  if not os.path.exists(path):
    raise NotAClipError(f'{src} is not a Hugging Face CLIP directory: missing config.json '
                        '(need config.json + model.safetensors, as save_pretrained writes).')
  with open(path) as f:
    hf = json.load(f)
  problems = []
  if hf.get('model_type') != 'clip':
    problems.append(f"model_type is {hf.get('model_type')!r}, expected 'clip'")
  for section, keys in (('text_config', TEXT_KEYS), ('vision_config', VISION_KEYS)):
    if not isinstance(hf.get(section), dict):
      problems.append(f'missing {section}')
      continue
    miss = [k for k in keys if k not in hf[section]]
    if miss:
      problems.append(f'{section} lacks {miss}')
  if 'projection_dim' not in hf:
    problems.append('missing projection_dim')
  if problems:
    raise NotAClipError(f'{path} is not a CLIPModel config: ' + '; '.join(problems) + '.')
  return hf


def model_config_from_hf(hf: dict) -> ml_collections.ConfigDict:
  """Our resolved CLIP model config from a Hugging Face CLIPConfig dict."""
  t, v = hf['text_config'], hf['vision_config']
  eos = int(t.get('eos_token_id', 2))
  return ml_collections.ConfigDict(dict(
      embed_dim=int(hf['projection_dim']),
      logit_scale_init=float(hf.get('logit_scale_init_value', 2.6592)),
      image_size=int(v['image_size']),
      text=dict(
          width=int(t['hidden_size']), depth=int(t['num_hidden_layers']),
          heads=int(t['num_attention_heads']), vocab_size=int(t['vocab_size']),
          mlp_dim=int(t['intermediate_size']),
          context_length=int(t['max_position_embeddings']),
          activation=_activation(t.get('hidden_act', 'quick_gelu'), 'text_config'),
          layer_norm_eps=float(t.get('layer_norm_eps', 1e-5)),
          # Hugging Face: eos_token_id == 2 is the legacy value and means argmax pooling.
          pool='argmax' if eos == 2 else 'eos', eos_token_id=eos),
      vision=dict(
          width=int(v['hidden_size']), depth=int(v['num_hidden_layers']),
          heads=int(v['num_attention_heads']), mlp_dim=int(v['intermediate_size']),
          patch_size=int(v['patch_size']),
          activation=_activation(v.get('hidden_act', 'quick_gelu'), 'vision_config'),
          layer_norm_eps=float(v.get('layer_norm_eps', 1e-5))),
  ))


def _mapping(m: ml_collections.ConfigDict) -> dict[str, tuple[str, Callable]]:
  """Our '/'-joined param name -> (Hugging Face key, numpy transform)."""
  same = lambda w: w
  transpose = lambda w: w.T

  def qkv(heads):
    return lambda w: w.T.reshape(w.shape[1], heads, -1)

  def qkv_bias(heads):
    return lambda b: b.reshape(heads, -1)

  def out(heads):
    return lambda w: w.T.reshape(heads, -1, w.shape[0])

  def blocks(ours, theirs, depth, heads):
    r = {}
    for i in range(depth):
      o, t = f'{ours}/transformer/layers_{i}', f'{theirs}.encoder.layers.{i}'
      for name, hf_name in (('query', 'q_proj'), ('key', 'k_proj'), ('value', 'v_proj')):
        r[f'{o}/attn/{name}/kernel'] = (f'{t}.self_attn.{hf_name}.weight', qkv(heads))
        r[f'{o}/attn/{name}/bias'] = (f'{t}.self_attn.{hf_name}.bias', qkv_bias(heads))
      r[f'{o}/attn/out/kernel'] = (f'{t}.self_attn.out_proj.weight', out(heads))
      r[f'{o}/attn/out/bias'] = (f'{t}.self_attn.out_proj.bias', same)
      for ln, hf_ln in (('ln_1', 'layer_norm1'), ('ln_2', 'layer_norm2')):
        r[f'{o}/{ln}/scale'] = (f'{t}.{hf_ln}.weight', same)
        r[f'{o}/{ln}/bias'] = (f'{t}.{hf_ln}.bias', same)
      for fc in ('fc1', 'fc2'):
        r[f'{o}/mlp/{fc}/kernel'] = (f'{t}.mlp.{fc}.weight', transpose)
        r[f'{o}/mlp/{fc}/bias'] = (f'{t}.mlp.{fc}.bias', same)
    return r

  def ln(ours, theirs):
    return {f'{ours}/scale': (f'{theirs}.weight', same), f'{ours}/bias': (f'{theirs}.bias', same)}

  r = {'logit_scale': ('logit_scale', same),
       'text/token_embedding/embedding': ('text_model.embeddings.token_embedding.weight', same),
       'text/position_embedding': ('text_model.embeddings.position_embedding.weight', same),
       'text/text_projection/kernel': ('text_projection.weight', transpose),
       'vision/class_embedding': ('vision_model.embeddings.class_embedding', same),
       'vision/patch_embedding/kernel': ('vision_model.embeddings.patch_embedding.weight',
                                         lambda w: w.transpose(2, 3, 1, 0)),
       'vision/position_embedding': ('vision_model.embeddings.position_embedding.weight', same),
       'vision/projection/kernel': ('visual_projection.weight', transpose)}
  r.update(ln('text/ln_final', 'text_model.final_layer_norm'))
  r.update(ln('vision/ln_pre', 'vision_model.pre_layrnorm'))
  r.update(ln('vision/ln_post', 'vision_model.post_layernorm'))
  r.update(blocks('text', 'text_model', int(m.text.depth), int(m.text.heads)))
  r.update(blocks('vision', 'vision_model', int(m.vision.depth), int(m.vision.heads)))
  return r


def _expected_shapes(m: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
  model = clip.build_model(m)
  s = int(m.image_size)
  shapes = jax.eval_shape(
      model.init, jax.random.PRNGKey(0), jnp.zeros((1, int(m.text.context_length)), jnp.int32),
      jnp.zeros((1, s, s, 3), jnp.float32))
  flat = flax.traverse_util.flatten_dict(flax.linen.unbox(shapes)['params'], sep='/')
  return {k: tuple(v.shape) for k, v in flat.items()}


def convert_weights(m: ml_collections.ConfigDict, weights: dict[str, np.ndarray],
                    source: str = 'model.safetensors') -> dict:
  """Hugging Face CLIPModel state dict (numpy) -> our params (nested dicts, float32)."""
  mapping = _mapping(m)
  needed = {hf for hf, _ in mapping.values()}
  missing = sorted(needed - set(weights))
  unexpected = sorted(set(weights) - needed - set(IGNORED_KEYS))
  if missing or unexpected:
    def show(keys):
      return ', '.join(keys[:12]) + (f' ... ({len(keys)} in all)' if len(keys) > 12 else '')
    msg = [f'{source} does not match a CLIPModel of this config.json:']
    if missing:
      msg.append(f'missing {len(missing)} weights: {show(missing)}')
    if unexpected:
      msg.append(f'unexpected {len(unexpected)} weights: {show(unexpected)}')
    raise NotAClipError(' '.join(msg))
  expected = _expected_shapes(m)
  assert set(expected) == set(mapping), sorted(set(expected) ^ set(mapping))
  flat, bad = {}, []
  for ours, (hf, fn) in mapping.items():
    w = fn(np.asarray(weights[hf], np.float32))
    if tuple(w.shape) != expected[ours]:
      bad.append(f'{hf} {tuple(weights[hf].shape)} -> {ours} {tuple(w.shape)} '
                 f'(expected {expected[ours]})')
    flat[ours] = np.array(w, np.float32, order="C")   # (ascontiguousarray makes 0-d 1-d)
  if bad:
    raise NotAClipError(f'{source}: shapes disagree with config.json: ' + '; '.join(bad))
  return flax.traverse_util.unflatten_dict(flat, sep='/')


def experiment_config(m: ml_collections.ConfigDict, src: str) -> ml_collections.ConfigDict:
  """A whole config with one `clip` stage, as training would have written it."""
  has_tokenizer = all(os.path.exists(os.path.join(src, f)) for f in ('vocab.json', 'merges.txt'))
  model = m.to_dict()
  image_size = model.pop('image_size')
  return ml_collections.ConfigDict(dict(
      seed=0,
      stages=('clip',),
      tokenizer=dict(path=os.path.abspath(src) if has_tokenizer else '',
                     context_length=int(m.text.context_length)),
      clip=dict(task='clip', image_size=image_size, model=model),
      source=dict(kind='huggingface_clip', path=os.path.abspath(src)),
  ))


def _read_preprocessor(src: str, m: ml_collections.ConfigDict):
  path = os.path.join(src, 'preprocessor_config.json')
  if os.path.exists(path):
    with open(path) as f:
      pre = json.load(f)
    if 'image_mean' in pre and 'image_std' in pre:
      m.image_mean = tuple(float(x) for x in pre['image_mean'])
      m.image_std = tuple(float(x) for x in pre['image_std'])


def convert(src: str) -> tuple[ml_collections.ConfigDict, dict]:
  """Reads a Hugging Face CLIP directory -> (experiment config, params)."""
  hf = read_hf_config(src)
  weights_path = os.path.join(src, 'model.safetensors')
  if not os.path.exists(weights_path):
    raise NotAClipError(f'{src} lacks model.safetensors (only safetensors weights are read; '
                        're-save the model with save_pretrained(..., safe_serialization=True)).')
  m = model_config_from_hf(hf)
  _read_preprocessor(src, m)
  params = convert_weights(m, st_numpy.load_file(weights_path), weights_path)
  return experiment_config(m, src), params


def convert_to_export(src: str, out: str) -> ml_collections.ConfigDict:
  from dalle2_jax.training import export  # pylint: disable=g-import-not-at-top
  config, params = convert(src)
  export.save_export(out, config, 'clip', params)
  return config


_SRC = None
_OUT = None


def _define_flags():
  """Command-line flags (defined only when run as a program, so that importing
  several modules with flags never clashes)."""
  global _SRC, _OUT
  _SRC = flags.DEFINE_string('src', None, 'Hugging Face CLIP directory (config.json + '
                             'model.safetensors).')
  _OUT = flags.DEFINE_string('out', None, 'Output export directory.')


def main(argv):
  del argv
  if not _SRC.value or not _OUT.value:
    raise app.UsageError('Pass --src HF_CLIP_DIR and --out EXPORT_DIR.')
  try:
    config = convert_to_export(_SRC.value, _OUT.value)
  except NotAClipError as e:
    raise SystemExit(f'error: {e}') from None
  m = config.clip.model
  print(f'Wrote {_OUT.value}: CLIP embed_dim={m.embed_dim} image_size={config.clip.image_size} '
        f'text {m.text.depth}x{m.text.width} vision {m.vision.depth}x{m.vision.width}/'
        f'{m.vision.patch_size}. Use it as prior.clip_checkpoint / decoder.clip_checkpoint.')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
