"""Data: captioned_shapes, image folders, the input pipeline, compositional scoring.

  captioned_shapes  the dataset's definition: palette, shapes, captions, splits, renderer,
                    `eval_prompts` (numpy only)
  builders          TFDS builders (captioned_shapes, image_folder), ArrayRecord, no TensorFlow
  pipeline          `make_input` (grain -> global jax.Arrays), `load_examples`
  scoring           the spec's detector and compositional-accuracy scorer

Import the submodules directly (`from dalle2_jax.data import pipeline`); this package
imports nothing so that light users (scoring) do not pay for TFDS.
"""
