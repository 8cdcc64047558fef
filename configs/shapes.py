r"""captioned_shapes: the embedded default, all four stages on a laptop CPU.

  python train.py --config configs/shapes.py --workdir runs/shapes
  python train.py --config configs/shapes.py:quick --workdir runs/shapes_quick

Trains clip -> prior -> decoder (32 px) -> upsampler (32 -> 64 px) in turn on the generated
captioned_shapes dataset (50,000 training examples, built into the TFDS data dir on first use
in under a minute). `:quick` is a first look: clip, prior and a 32 px decoder in 16 min. Then

  python sample.py --workdir runs/shapes --prompt "a large red circle in the top left"
  python -m dalle2_jax.evaluate --workdir runs/shapes

Per-stage checks: python -m dalle2_jax.evaluation.zero_shot --workdir runs/shapes (CLIP),
python -m dalle2_jax.tasks.prior --workdir runs/shapes (prior vs text-embedding baseline).
"""

import ml_collections


def get_config(arg=None):
  quick = arg == 'quick'
  if arg not in (None, '', 'quick'):
    raise ValueError(f'configs/shapes.py takes no argument or :quick, not {arg!r}.')
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Stages run in this order; each is a config section of that name, whose `task` field
  # says what it trains, and writes into <workdir>/<stage>. A cascade of upsamplers is
  # several sections with task='upsampler' (see configs/dalle2_paper.py).
  c.stages = ('clip', 'prior', 'decoder', 'upsampler')

  c.data = dict(
      name='captioned_shapes',   # a TFDS name, or 'image_folder' (see `folder`)
      data_dir='',               # TFDS data dir; '' = TFDS default (~/tensorflow_datasets)
      folder='',                 # image_folder only: images with same-stem .txt captions
      train_split='train',
      eval_split='test',
      image_key='image',
      caption_key='caption',
      image_size=64,             # default size; a stage may set its own image_size
      worker_count=0,            # grain worker processes (0 = in the main process)
      # Decoded records kept in memory after their first read (the 50,000 training
      # images, 0.6 GB at 64 px): CLIP steps 0.34-0.35 s instead of 0.43-0.44 after the
      # first epoch, 0.37-0.38 instead of 0.43 in it (steps 450-700 and 50-400 of 700, two
      # runs each, an AMD EPYC's 2 cores; peak memory 3.0-3.3 GB against 2.5-2.6).
      cache_decoded=True,
      # captioned_shapes generation (ignored by other datasets)
      shapes=dict(seed=0, num_train=50000, num_test=1000, num_heldout=1000),
  )
  c.tokenizer = dict(path='', context_length=32)   # '' = packaged OpenAI CLIP BPE

  c.mesh = dict(data=-1, fsdp=1)   # -1: the rest of the devices
  # Multi-host (train.py flags override): enabled=True with no address = JAX's automatic
  # cluster detection (Cloud TPU, SLURM); or an explicit coordinator 'host:port'.
  c.distributed = dict(enabled=False, coordinator_address='', num_processes=0,
                       process_id=-1)
  c.compilation_cache_dir = ''   # persistent XLA cache ('' = off): restarts skip compiling
  # On CPU, train data parallel over this many XLA devices made of the host's cores (0 = one
  # device): XLA:CPU parallelises one device's convolutions poorly, and on 2 cores the decoder
  # steps 1.25x as fast on 2 devices (0.30 vs 0.37 s), the upsampler 1.15x (runtime.py).
  c.num_cpu_devices = 2
  # Logical axis name -> mesh axes. Data parallel: fsdp=1; FSDP: set mesh.fsdp > 1.
  c.axis_rules = (
      ('batch', ('data', 'fsdp')),
      ('embed', 'fsdp'),
      ('conv_out', 'fsdp'),
      ('mlp', None),
      ('heads', None),
      ('kv', None),
      ('vocab', None),
      ('conv_in', None),
      ('length', None),
  )

  def stage(task, steps, batch_size, lr, ema_decay, ema_warmup_steps=0):
    return dict(
        task=task,
        steps=steps,
        batch_size=batch_size,   # global batch
        dtype='float32',         # compute dtype; params and optimizer state stay float32
        remat=False,
        optim=dict(lr=lr, warmup_steps=100, schedule='cosine', end_lr_factor=0.1,
                   b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip=1.0,
                   grad_accum=1),
        ema=dict(decay=ema_decay, warmup_steps=ema_warmup_steps),
        log_every=50,
        ckpt_every=500,
        keep=2,
        sample_every=0,          # 0 = no sample grids during training
        max_nonfinite=5,         # consecutive non-finite steps before the run stops
        two_object_repeats=1,    # each two-object scene this many times an epoch (1: a quarter)
    )

  # CLIP: zero-shot colour/shape/size/position accuracy >= 95% on `test`, >= 90% on
  # `heldout` (python -m dalle2_jax.evaluation.zero_shot --workdir W). Measured (runs/s24m,
  # this config, 4000 steps, 29 min on 2 cores): test 100/100/100/100%, heldout
  # 99.9/99.6/100/99.6%; binding (true caption beats colours swapped / shapes swapped /
  # relation reversed) test 86/96/94%, heldout 75/89/88% (chance 50%). Before mirror
  # negatives: binding 65-72/90-93/80-82% and 53-61/84-85/71-78%. 3000 steps gave heldout
  # position 88.8%; without the colour augmentation and the pixel stem, heldout shape was 42%
  # (2000 steps). 6000 steps instead of 4000 (the cosine schedule stretched; 54-58 min on an
  # AMD EPYC's 2 cores against 36-41), seeds 0 and 1 each (docs/shapes_experiments.md,
  # 2026-12-06 late night): binding colours / shapes / relation on `heldout` 98.0 / 98.7 /
  # 97.6% and 84.7 / 92.7 / 92.4% against 94.0 / 94.7 / 83.3% and 84.7 / 88.0 / 80.5%, on
  # `test` 99.2 / 100 / 99.5% and 99.2 / 100 / 97.7% against 93.9 / 98.1 / 92.1% and 89.3 /
  # 98.1 / 90.2%; the prior trained on it binds held-out colours at 86.3 and 80.5% against
  # 75.7 and 76.5% (python -m dalle2_jax.tasks.prior). The whole chain on it (python -m
  # dalle2_jax.evaluate --num_prompts 64, sampling seeds 0 and 1), seen / held-out /
  # two-object: seed 0 (runs/c6k0, the README's run) 93.5 / 75.8 / 65.2%, seed 1 (runs/c6k1)
  # 90.1 / 72.4 / 58.6% (on 4000 CLIP steps, sampling seed 0: 91.1 / 73.4 / 59.4% and 89.1 /
  # 61.5 / 50.8%); the chain took about 2 h 50 min on an AMD EPYC, about 2 h 40 min since
  # train.py keeps XLA:CPU's temporaries in one heap (dalle2_jax/cpu_flags.py): this CLIP
  # stage 45.6 min (runs/k0, zero-shot figures runs/c6k0's to the digit); about 2 h 11 min
  # with the decoder's attention at 8 x 8 only (below); 1 h 45 min in one go with 13000
  # decoder steps and the records kept in memory (runs/e53; data.cache_decoded: this stage
  # 33.4 min, 0.325 s/step, the same weights to the byte). 5000 steps bound held-out pairs
  # 92.7 / 96.0 / 92.4% (runs/c5k, 35.7 min), too little for the held-out target.
  c.clip = stage('clip', steps=6000, batch_size=128, lr=1e-3, ema_decay=0.995)
  c.clip.image_size = 64
  c.clip.optim.weight_decay = 0.05
  # Half the examples get random off-palette object colours and captions without colour
  # words (never a held-out pair): the image tower's shape and position features stop
  # depending on colour, which the held-out (colour, shape) pairs need.
  c.clip.recolour_prob = 0.5
  # NegCLIP: each image is also contrasted with its caption's attributes re-bound (two
  # objects' colours or shapes swapped, the relation reversed; one attribute changed), which
  # random in-batch negatives almost never test (tasks/hard_negatives.py).
  c.clip.hard_negatives = True
  # The three below, with clip.two_object_repeats=3, left the relation at chance and lost
  # held-out positions (docs/shapes_experiments.md, 2026-12-04), so they are off.
  c.clip.num_hard_negatives = 1   # per example, of different kinds (tasks/hard_negatives.py)
  c.clip.order_swap_negatives = False   # also "a B to the left of an A" for "an A ... a B"
  c.clip.converse_prob = 0.0      # two-object captions rewritten as their converse
  # Each image mirrored as a hard negative image for a caption the mirror makes false:
  # 'left_right' (a left/right relation or column), 'both' (also up-down, scenes without a
  # triangle), 'none' (tasks/hard_negatives.py MirrorNegatives). 'left_right' took zero-shot
  # relation binding from 59.8 to 93.9% (held-out pairs 53.4 to 88.0%; above/below too) and
  # colour/shape binding from 71.8/76.0 to 86.3/96.2%, positions kept (runs/s24m,
  # docs/shapes_experiments.md).
  c.clip.mirror_negatives = 'left_right'
  # A two-object image with its objects' colours exchanged as the hard negative image
  # instead, where that draws no held-out pair (tasks/hard_negatives.py MirrorNegatives).
  # On `heldout` (runs/s33 against runs/s26, docs/shapes_experiments.md 2026-12-05): binding
  # colours / shapes / relation 87.3 / 89.3 / 86.9% against 76.7 / 82.7 / 82.5%, the text
  # embedding's colour binding 73.9 against 59.7% and the prior's 68.6 against 61.9%
  # (python -m dalle2_jax.tasks.prior), single objects kept. End to end (runs/s33 against
  # runs/s28, python -m dalle2_jax.evaluate --num_prompts 128): seen / held-out / two-object
  # 87.2 / 75.0 / 54.3% against 86.2 / 63.5 / 44.5%.
  c.clip.colour_swap_negatives = True
  # Two more kinds of hard negative image (tasks/hard_negatives.py MirrorNegatives), each
  # for CLIP's wrong picks among decoder candidates: a two-object image with its second
  # object moved where the caption's relation is false (relocate), and an image of small
  # objects with one copied into an empty cell (extra_object). As rerankers of runs/shapes's
  # decoder candidates neither CLIP beat the config's before (8 per two-object prompt, seen /
  # held-out picks right: 69.5 / 32.0% relocate, 68.0 / 32.8% extra_object, 69.5 / 33.6%
  # without). The whole chain trained on the relocate CLIP (runs/r1) did better: seen /
  # held-out / two-object 90.1 / 67.7 / 55.9% and 90.4 / 71.6 / 59.8% over two evaluation
  # seeds, against 87.8 / 69.8 / 54.7% and 88.5 / 68.2 / 53.9% (runs/shapes); seen
  # two-object prompts 75.8 / 78.1% against 68.0 / 71.1%, their relation wrong in 3.9 / 7.0%
  # instead of 11.7% (docs/shapes_experiments.md, 2026-12-06 evening). A second training
  # run with it (runs/s41, --config.seed=1) scored 78.4 / 68.5 / 32.8%: its CLIP bound the
  # relation less (zero-shot 79.0 / 66.9% on test / heldout against runs/r1's 90.2 / 82.1%)
  # and the chain drew it wrong on 35% of seen pairs. Without it the same seed's CLIP binds
  # the relation (runs/s42c: 91.1 / 84.9%), as every CLIP without it has (88-91% on test),
  # so it is off: one good run of two does not make a default (docs/shapes_experiments.md,
  # 2026-12-06 night).
  c.clip.relocate_negatives = False
  c.clip.extra_object_negatives = False   # not tried through the chain
  c.clip.model = dict(
      embed_dim=64,
      text=dict(width=64, depth=2, heads=2, vocab_size=49408, activation='quick_gelu'),
      vision=dict(width=64, depth=3, heads=2, patch_size=8, activation='quick_gelu',
                  stem_width=16),   # per-pixel MLP before the patches (models/clip.py)
      logit_scale_init=2.6592,   # log(1/0.07); exp(logit_scale) is clamped at 100
  )

  # Prior: on `test` captions, sampled image embeddings have a mean cosine with the true ones
  # >= 0.1 above the text embedding's (python -m dalle2_jax.tasks.prior --workdir W).
  # Measured with this config's CLIP (2 candidates, 64 DDIM steps, unguided): test 0.921 vs
  # 0.793, heldout 0.898 vs 0.773 (mean-image baseline 0.48 / 0.56); runs/s16 0.913 / 0.884
  # unguided and 0.898 / 0.879 at the guidance below (baseline 0.780 / 0.765): guidance
  # lowers the cosine a little while it makes held-out colours right (below). 500 steps, or
  # x0's error weighted as the decoder's, scored no better through the decoder (two seeds
  # each; docs/shapes_experiments.md, 2026-12-05 midnight).
  c.prior = stage('prior', steps=1000, batch_size=64, lr=1e-3, ema_decay=0.995)
  c.prior.image_size = 64        # = clip.image_size: images only go through the frozen CLIP
  c.prior.clip_checkpoint = ''   # '' = <workdir>/clip of this run
  c.prior.model = dict(width=128, depth=2, heads=4, cond_drop_prob=0.1,
                       activation='gelu_tanh',   # MLP activation (layers.ACTIVATIONS)
                       attention_impl='xla',     # 'cudnn': fused, NVIDIA GPUs in bfloat16
                       embed_norm='standardize',   # 'l2' (x sqrt(dim)) or 'standardize'
                       stats_examples=4096,        # standardize: training examples used
                       # The pooled text embedding only, not the paper's token encodings
                       # too: with them the prior lost the text embedding's colour binding
                       # on held-out pairs (python -m dalle2_jax.tasks.prior, runs/s43's
                       # CLIP, three prior seeds each: heldout 61.5 / 64.6 / 65.0% against
                       # 74.3 / 70.8 / 72.1% without, the text embedding's own 75.2%; test
                       # 87.4 / 88.5 / 88.5% against 90.7 / 89.1 / 88.5%), its samples were
                       # no nearer the true embeddings (heldout cosine 0.889 / 0.882 / 0.888
                       # against 0.895 / 0.893 / 0.889), and its steps cost 1.5x (36
                       # positions instead of 4). Its first chain (runs/shapes, seed 0): prior
                       # colour binding heldout 75.7% (text 79.6%); evaluate --num_prompts 64
                       # seen / held-out / two-object 91.1 / 73.4 / 59.4%; seed 1 (runs/s1):
                       # prior 76.5%, chain 89.1 / 61.5 / 50.8%, its CLIP weaker on held-out
                       # pairs (docs/shapes_experiments.md, 2026-12-06 afternoon to night).
                       text_encodings=False)
  c.prior.diffusion = dict(schedule='cosine', timesteps=1000, objective='x0',
                           learned_variance=False)
  # sampler: 'ddim' | 'ddpm' | 'dpmpp_2m'; spacing: 'trailing' | 'leading' | 'linspace'
  # Guidance 4 (Karlo's and diffusers' default): unguided, the prior gives held-out prompts
  # the colours of seen pairs. On runs/s16 (python -m dalle2_jax.evaluate, 64 prompts a row)
  # guidance 1 / 2 / 4 / 6 / 8 scored held-out 30.7 / 42.7 / 50.5 / 48.4 / 46.4% (held-out
  # partial prompts' colour 39 / 72 / 81 / 77 / 78%), seen 67.7 / 68.2 / 68.2 / 68.8 / 66.1%;
  # above 4 the sizes go wrong (held-out partial prompts' size 96 / 96 / 88 / 68 / 68%).
  c.prior.sample = dict(sampler='ddim', steps=64, guidance_scale=4.0, num_candidates=2,
                        spacing='trailing')

  # Decoder: 32 px ADM UNet conditioned on the CLIP image embedding (+ caption tokens). CLIP
  # embeds the 64 px image (tasks/decoder.py: input_image_size), the target is it at 32 px.
  # Batch 16: batch 24 steps in 0.43 s against 0.29 (the first 850 steps of each, an AMD
  # EPYC's 2 cores, 2 devices: num_cpu_devices), 56 against 54 examples/s, so a larger
  # batch buys no examples, only fewer updates (runs/b24, stopped). What the whole chain
  # scores, and what each decoder setting below changed, is in the README and
  # docs/shapes_experiments.md (python -m dalle2_jax.evaluate). lr 6e-4: on one CLIP and
  # prior, 6e-4 and 1e-3 both scored above 3e-4 (two-object prompts 18.8 / 18.4% vs 13.3%).
  # 15000 steps: 100 min at the 0.40 s/step of a 2-core Intel Xeon, 66 min at an AMD EPYC's
  # 0.26. runs/s26's 10000-step decoder resumed to 15000 (runs/s28) scored seen / held-out /
  # two-object 86.2 / 63.5 / 44.5% against 81.0 / 60.2 / 37.9% (128 prompts a row), past
  # the 2-hour budget on the Xeon; on to 20000 (runs/s29) 84.6 / 65.6 / 44.1%, no more gain
  # beyond the noise (docs/shapes_experiments.md). On this config's 6000-step CLIP and prior
  # (runs/c6k0, 2 sampling seeds), 10000 steps again fell short: 91.2 / 70.3 / 59.0%
  # against 15000's 93.5 / 75.8 / 65.2% (103 min at another AMD EPYC's 0.41 s/step).
  # 13000 with attention at 8 x 8 only (runs/d13 on runs/a8's CLIP, prior and upsampler;
  # 69.7 min on an AMD EPYC, 0.306 s/step): 93.8 / 76.6 / 66.4% over sampling seeds 0 / 1
  # against 15000's 93.5 / 79.7 / 67.6% (runs/a8, 77.4 min), held-out 79.7 / 73.4% by seed:
  # 8 min for about 3 points of held-out pairs. The whole chain in one go (runs/e53, the
  # records kept in memory): decoder 63.8 min (0.280 s/step), chain 1 h 45 min; over
  # sampling seeds 0-3 93.3 / 77.5 / 67.8% against 15000's 94.8 / 79.4 / 70.3% (about 1 h
  # 55 min projected, too near the 2-hour budget).
  c.decoder = stage('decoder', steps=13000, batch_size=16, lr=6e-4, ema_decay=0.999,
                    ema_warmup_steps=200)
  # A quarter of the examples get off-palette colours and colour-free captions (as CLIP's
  # recolour_prob): every shape is drawn in many colours, taken from the image embedding.
  c.decoder.recolour_prob = 0.25
  # Each two-object scene nine times an epoch: three quarters of the decoder's examples have
  # two objects (a quarter as stored), which it draws worst. 3 instead of 1 drew the right
  # number of objects in 67% of two-object samples instead of 50%. 9 instead of 3, at lr
  # 6e-4 / 1e-3 on one CLIP and prior (128 prompts a row): two-object count 97 / 97% against
  # 93 / 95% and both shapes right in 78 / 73% against 68 / 68% (seen pairs), held-out
  # partial prompts 76.6 / 74.2% against 69.5 / 65.6%, single objects no worse; the overall
  # figures moved within the noise (two-object 22.7 / 16.8% against 18.8 / 18.4%), held down
  # by the relation (docs/shapes_experiments.md).
  c.decoder.two_object_repeats = 9
  c.decoder.sample_every = 1000
  c.decoder.clip_checkpoint = ''
  c.decoder.image_size = 32
  # Attention at 8 x 8 only (and in the middle), not also at 16 x 16: steps a fifth faster
  # (0.297 against 0.379 s on an AMD EPYC's 2 cores: 77 min for 15000 instead of about 95).
  # On runs/c6k0's CLIP and prior (runs/a8; python -m dalle2_jax.evaluate --num_prompts 64)
  # seen / held-out / two-object 94.8 / 82.3 / 70.3% and 92.2 / 77.1 / 64.8% (sampling seeds
  # 0 / 1) against (16, 8)'s 92.7 / 76.6 / 65.6% and 94.3 / 75.0 / 64.8%; on an older CLIP
  # 89.3 / 72.9 / 58.6% against 89.3 / 75.5 / 58.2% (runs/s34 against runs/s33, 128 prompts
  # a row; docs/shapes_experiments.md).
  c.decoder.model = dict(
      channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(8,),
      head_channels=32, dropout=0.0, num_clip_tokens=4,
      # The embedding also as an 8 x 8 feature map (not in the paper): where two objects go
      # is in it, but far from linearly (docs/shapes_experiments.md); 0-5 points better,
      # about one standard error.
      clip_embed_map=True,
      text_encoder='clip', image_embed_drop_prob=0.1, text_drop_prob=0.5,
      # The caption's CLIP text embedding also added to the timestep embedding (GLIDE adds
      # its text encoder's final token there, Karlo the CLIP text embedding). Same CLIP and
      # prior, 128 prompts a row (docs/shapes_experiments.md): seen / held-out / two-object
      # 81.0 / 60.2 / 37.9% with it (runs/s26), 76.3 / 58.9 / 30.9% without (runs/s27);
      # two-object prompts of seen pairs 56.2 against 44.5%.
      text_embed_in_time=True,
      attention_impl='xla',     # 'cudnn': fused, NVIDIA GPUs in bfloat16
      custom_conv_grad=False)   # True: hand-written CPU conv gradient (bench/conv_grad.py)
  # The paper's decoder predicts eps with a learned variance (configs/dalle2_paper.py). At
  # this training length eps is not accurate enough near t = T, where
  # x0 = (x_t - sqrt(1 - a) eps) / sqrt(a) multiplies its error by up to 1/sqrt(a) ~ 10^4:
  # 600 steps reached an eps-MSE of 0.02 and sampled pure noise from t = 999 while
  # denoising well from t = 900. Predicting x0 (as the prior does) has no such blow-up and
  # learned the shapes fastest of x0 / v / eps in tests/test_decoder.py's overfit test. DDIM
  # ignores a learned variance, so it is off.
  # loss_weight: the timestep weighting of the x0 error, whatever is predicted ('' = the
  # objective's own; diffusion/gaussian.py). 'v' capped at 6: x0's weight near pure noise, up
  # to 6x near the data. Against x0's own (uniform) weighting on the same CLIP, prior, data
  # order and noise (docs/shapes_experiments.md; 128 prompts a row, prior unguided):
  # unweighted x0 error 4-9% lower in every 1000-step window; seen / held-out / two-object
  # 66.7 / 32.8 / 7.0% vs 62.5 / 35.2 / 7.8%, and from the true renderings' embeddings
  # 69.3 / 56.0 / 12.1% vs 65.4 / 44.0 / 10.5%.
  c.decoder.diffusion = dict(schedule='cosine', timesteps=1000, objective='x0',
                             learned_variance=False, loss_weight='v', loss_weight_cap=6.0)
  # Guidance only for t < 600 (Kynkäänniemi et al. 2024): guided from pure noise the decoder
  # draws a third object. On runs/s16, 128 prompts a row (prior guidance 4): seen / held-out /
  # two-object 67.7 / 48.7 / 12.1% against 67.2 / 47.4 / 9.0% guided at every step, two-object
  # count 82% against 72%, CLIP FD 8.7 against 9.5, and 10 of the 25 steps without the
  # doubled batch. Guidance 5 in the same interval scored 62.8 / 46.4 / 11.7%.
  # Best of N by CLIP (num_candidates; the sampler's decoder reranking, N x the decoder's
  # sampling cost): with the interval the candidates differ enough for it to pick. On
  # runs/s16 best of 4 scored 70.3 / 53.1 / 19.9% against 67.7 / 48.7 / 12.1% for one
  # sample; guided at every step it gained little (64 prompts a row, prior unguided: 68.2 /
  # 35.4 / 13.3% against 67.7 / 30.7 / 14.1%). With the mirror-negative CLIP (runs/s24c,
  # 128 prompts a row) best of 8 scored 85.4 / 52.6 / 40.2% against best of 4's 81.0 /
  # 53.1 / 36.7%: seen two-object prompts 61.7 against 53.9%, held-out ones unchanged.
  # rerank_mirror: CLIP scores each candidate also flipped left to right, against the prompt
  # with 'left' and 'right' exchanged, and ranks by the sum (sampling.mirror_caption). On
  # runs/s33 (python -m dalle2_jax.evaluate --num_prompts 128 --decoder_rerank_mirror):
  # seen / held-out / two-object 89.3 / 75.5 / 58.2% against 87.2 / 75.0 / 54.3%; two-object
  # prompts of seen / held-out pairs 73.4 / 43.0% against 71.1 / 37.5%.
  # image_embed_guidance_scale 1: the caption guided given the image embedding, the
  # embedding itself not (InstructPix2Pix's two scales; sampling.StageSampling). The prior's
  # samples for a prompt that leaves size or place open are one blend that the decoder,
  # guided on it, draws with its colour's seen shape; the caption's guidance keeps the
  # named shape. On runs/shapes (python -m dalle2_jax.evaluate --num_prompts 128
  # --decoder_image_embed_guidance_scale 1): seen / held-out / two-object 87.8 / 69.8 /
  # 54.7% against 85.9 / 65.6 / 51.2% (held-out partial prompts 80.5 against 71.1%), the
  # same cost (two model rows a step). Text-to-image only: variations, interpolations and
  # text diffs have no caption and keep plain guidance (UnCLIP.default_settings).
  c.decoder.sample = dict(sampler='ddim', steps=25, guidance_scale=3.0,
                          guidance_interval=(0, 600), num_candidates=8, rerank_mirror=True,
                          image_embed_guidance_scale=1.0)

  # Upsampler: 32 -> 64 px, no attention, trained on 32 px crops of the 64 px images.
  c.upsampler = stage('upsampler', steps=1500, batch_size=16, lr=3e-4, ema_decay=0.999,
                      ema_warmup_steps=200)
  c.upsampler.low_res = 32      # the image it conditions on (a resized dataset image)
  c.upsampler.high_res = 64     # the image it makes
  c.upsampler.image_size = c.upsampler.get_ref('high_res')   # what the input pipeline loads
  c.upsampler.crop_frac = 0.5   # trains on random crops of this fraction of high_res
  c.upsampler.degradation = 'blur'   # 'blur' (first upsampler) or 'bsr' (second)
  c.upsampler.noise_aug = 0.0        # max noise level of low-res noise augmentation
  # image_embed_cond=True (the UNet also takes the decoder's CLIP image embedding) was no
  # better: one upsampling of the same decoder samples drew 43.4 / 14.1% of seen / held-out
  # two-object prompts right against 45.3 / 15.6% (docs/shapes_experiments.md).
  c.upsampler.model = dict(channels=32, channel_mult=(1, 2), num_res_blocks=1,
                           attention_resolutions=(), head_channels=32, dropout=0.0,
                           custom_conv_grad=False, image_embed_cond=False)
  c.upsampler.diffusion = dict(schedule='cosine', timesteps=1000, objective='v',
                               learned_variance=False)
  c.upsampler.sample = dict(sampler='ddim', steps=7)

  if quick:   # a first look in under 20 minutes: 32 px samples, no upsampler
    c.stages = ('clip', 'prior', 'decoder')
    for name in c.stages:
      c[name].steps = c[name].steps // 5
      c[name].ckpt_every = 200
    c.clip.steps = 800   # as measured (README); a fifth of 4000, the steps before 6000
    # The decoder is most of the time. 600 steps drew blobs in muted, wrong colours.
    c.decoder.steps = 1000
    c.decoder.two_object_repeats = 3   # as measured (README); 9 is untried at 1000 steps
  c.lock()
  return c
