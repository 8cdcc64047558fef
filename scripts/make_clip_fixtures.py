r"""Writes golden CLIP fixtures from Hugging Face transformers' PyTorch `CLIPModel`.

  /work/refvenv/bin/python scripts/make_clip_fixtures.py [--out tests/fixtures]

Needs torch + transformers (a reference venv; the package and its tests never import
torch). For each tiny random config it writes
  tests/fixtures/clip_<name>/config.json, model.safetensors   a Hugging Face CLIP directory
  tests/fixtures/clip_<name>_io.safetensors                   inputs and outputs:
      input_ids [B, L] int32, pixel_values [B, 3, S, S] (NCHW, already CLIP-normalised),
      text_embeds [B, D] (projected, not normalised), text_last_hidden [B, L, W],
      image_embeds [B, D] (projected, not normalised), logits_per_image [B, B]
tests/test_clip_convert.py imports each directory with dalle2_jax.convert.hf_clip and
compares. The configs cover both activations, projection dim != width, both pooling rules
(legacy eos_token_id=2 -> argmax; otherwise first eos) and patch grids 3x3 and 8x8.
"""

import argparse
import json
import os

import numpy as np
from safetensors.numpy import save_file
import torch
import transformers

CONFIGS = {
    # quick_gelu, image 48 / patch 16 (3x3 grid), projection 24 != widths, argmax pooling.
    'quick_gelu_48': dict(
        projection_dim=24, logit_scale_init_value=2.6592,
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=16, hidden_act='quick_gelu',
                         eos_token_id=2, bos_token_id=0, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=2, image_size=48, patch_size=16,
                           hidden_act='quick_gelu')),
    # exact gelu, image 64 / patch 8 (8x8 grid), text and vision widths differ, first-eos
    # pooling with an eos id that is not the largest id, layer_norm_eps != 1e-5.
    'gelu_64': dict(
        projection_dim=16, logit_scale_init_value=1.5,
        text_config=dict(vocab_size=100, hidden_size=24, intermediate_size=40,
                         num_hidden_layers=2, num_attention_heads=3,
                         max_position_embeddings=12, hidden_act='gelu',
                         layer_norm_eps=1e-6, eos_token_id=50, bos_token_id=49,
                         pad_token_id=0),
        vision_config=dict(hidden_size=40, intermediate_size=56, num_hidden_layers=1,
                           num_attention_heads=5, image_size=64, patch_size=8,
                           hidden_act='gelu', layer_norm_eps=1e-6)),
}


def make_tokens(rng, cfg, batch, length):
  """Random ids with one eos per row, padding after it."""
  t = cfg['text_config']
  eos, pad = t['eos_token_id'], t['pad_token_id']
  ids = np.full((batch, length), pad, np.int64)
  for i in range(batch):
    n = rng.integers(2, length + 1)   # eos position + 1
    if eos == 2:   # legacy argmax pooling: eos must be the largest id of the row
      ids[i, :n] = rng.integers(3, t['vocab_size'], n)
      ids[i, n - 1] = t['vocab_size'] - 1   # OpenAI: end-of-text is the top id
    else:          # first-eos pooling: ids larger than eos before it, eos repeated after
      ids[i, :n - 1] = rng.integers(eos + 1, t['vocab_size'], n - 1)
      ids[i, n - 1] = eos
      ids[i, n:] = eos
  return ids


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), '..', 'tests',
                                                    'fixtures'))
  args = parser.parse_args()
  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  for name, cfg in CONFIGS.items():
    config = transformers.CLIPConfig(**cfg)
    model = transformers.CLIPModel(config).eval().float()
    with torch.no_grad():   # perturb every weight so LayerNorms and biases are not trivial
      for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p))
    directory = os.path.join(args.out, f'clip_{name}')
    model.save_pretrained(directory, safe_serialization=True)
    # Keep only what the importer reads (no generation_config etc.).
    for f in os.listdir(directory):
      if f not in ('config.json', 'model.safetensors'):
        os.remove(os.path.join(directory, f))
    batch = 3
    length = cfg['text_config']['max_position_embeddings']
    size = cfg['vision_config']['image_size']
    input_ids = make_tokens(rng, cfg, batch, length)
    pixel_values = rng.normal(size=(batch, 3, size, size)).astype(np.float32)
    with torch.no_grad():
      ids_t = torch.from_numpy(input_ids)
      pix_t = torch.from_numpy(pixel_values)
      text_out = model.get_text_features(input_ids=ids_t)
      image_out = model.get_image_features(pixel_values=pix_t)
      out = model(input_ids=ids_t, pixel_values=pix_t)
    arrays = dict(
        input_ids=input_ids.astype(np.int32),
        pixel_values=pixel_values,
        text_embeds=text_out.pooler_output.numpy(),
        text_last_hidden=text_out.last_hidden_state.numpy(),
        image_embeds=image_out.pooler_output.numpy(),
        logits_per_image=out.logits_per_image.numpy(),
    )
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()},
              os.path.join(args.out, f'clip_{name}_io.safetensors'),
              metadata=dict(transformers=transformers.__version__,
                            torch=torch.__version__, config=json.dumps(cfg)))
    print(name, {k: v.shape for k, v in arrays.items()})


if __name__ == '__main__':
  main()
