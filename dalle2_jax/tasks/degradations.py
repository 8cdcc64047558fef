"""Low-resolution conditioning augmentation of the upsamplers, in jnp (inside the jitted step).

unCLIP App. C: the first upsampler (64 -> 256) sees its low-resolution input corrupted with a
Gaussian blur (kernel 3, sigma 0.6); the second (256 -> 1024) with a "BSR" degradation
(Zhang et al. 2021, "Designing a practical degradation model for deep blind image
super-resolution", as used by latent diffusion's `degradation_bsrgan_variant`). Both run on
images in [-1, 1], [B, H, W, 3].

  blur_degradation(images, low_res)      downsample (antialiased) to low_res, then blur
  bsr_degradation(rng, images, low_res)  per example: random anisotropic Gaussian blur at
                                         the high resolution, downsample with a random
                                         kernel (area / bilinear / bicubic), Gaussian noise
                                         of random level, JPEG compression of random quality
  jpeg_compress(images, quality)         baseline JPEG's lossy steps in jnp
  noise_augment(rng, diffusion, low_res, max_level)   diffusion noise at a random level
                                         (returned, so the model can be told)

Approximations of BSR, for static shapes under jit: the random-scale intermediate resize and
the random order of the degradations are left out (a fixed order blur -> resize -> noise ->
JPEG is used), and JPEG is simulated rather than encoded: colour conversion to YCbCr, 4:2:0
chroma subsampling (2x2 mean, linear interpolation back as libjpeg's "fancy upsampling"), 8x8 DCT, quantisation with the IJG
standard tables scaled by quality, 8-bit rounding. That is every lossy step of baseline JPEG
(the entropy coding it leaves out is lossless); tests/test_upsampler.py compares it with
PIL's encoder.
"""

from __future__ import annotations

import math

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


# --- blur --------------------------------------------------------------------------------

def gaussian_kernel1d(sigma, size: int) -> Array:
  """Normalised 1-D Gaussian taps [..., size] for sigma [...] (broadcast)."""
  r = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2
  sigma = jnp.asarray(sigma, jnp.float32)[..., None]
  k = jnp.exp(-0.5 * jnp.square(r / sigma))
  return k / jnp.sum(k, axis=-1, keepdims=True)


def _depthwise(images: Array, kernel2d: Array) -> Array:
  """Per-channel 2-D filtering of [B, H, W, C] with one kernel [kh, kw] (reflect padding)."""
  c = images.shape[-1]
  kh, kw = kernel2d.shape
  x = jnp.pad(images, ((0, 0), (kh // 2, (kh - 1) // 2), (kw // 2, (kw - 1) // 2), (0, 0)),
              mode='reflect')
  w = jnp.broadcast_to(kernel2d[:, :, None, None], (kh, kw, 1, c)).astype(images.dtype)
  return lax.conv_general_dilated(x, w, (1, 1), 'VALID',
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                  feature_group_count=c)


def gaussian_blur(images: Array, sigma: float = 0.6, kernel_size: int = 3) -> Array:
  """Isotropic Gaussian blur of [B, H, W, C] with one sigma for the batch."""
  k = gaussian_kernel1d(sigma, kernel_size)
  return _depthwise(images, jnp.outer(k, k))


def anisotropic_kernel(sigma_x, sigma_y, theta, size: int) -> Array:
  """A normalised 2-D Gaussian [size, size] with axes sigma_x, sigma_y rotated by theta."""
  r = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2
  yy, xx = jnp.meshgrid(r, r, indexing='ij')
  c, s = jnp.cos(theta), jnp.sin(theta)
  u, v = c * xx + s * yy, -s * xx + c * yy
  k = jnp.exp(-0.5 * (jnp.square(u / sigma_x) + jnp.square(v / sigma_y)))
  return k / jnp.sum(k)


# --- resizing ----------------------------------------------------------------------------

def resize(images: Array, size: int, method: str = 'bicubic', antialias: bool = True
           ) -> Array:
  b, _, _, c = images.shape
  return jax.image.resize(images, (b, size, size, c), method=method, antialias=antialias)


def area_downsample(images: Array, size: int) -> Array:
  """Box-filter downsampling by an integer factor (falls back to antialiased linear)."""
  b, h, w, c = images.shape
  if h % size or w % size or h != w:
    return resize(images, size, 'linear')
  f = h // size
  return images.reshape(b, size, f, size, f, c).mean(axis=(2, 4))


# --- the two degradations ----------------------------------------------------------------

def blur_degradation(images: Array, low_res: int, sigma: float = 0.6,
                     kernel_size: int = 3) -> Array:
  """The first upsampler's conditioning: antialiased bicubic downsample, then the paper's
  Gaussian blur (kernel 3, sigma 0.6)."""
  low = resize(images, low_res, 'bicubic')
  return jnp.clip(gaussian_blur(low, sigma, kernel_size), -1.0, 1.0)


# IJG (libjpeg) standard quantisation tables, quality 50.
_JPEG_LUMA = np.array([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56], [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], np.float32)
_JPEG_CHROMA = np.full((8, 8), 99, np.float32)
_JPEG_CHROMA[:4, :4] = np.array([[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99],
                                 [47, 66, 99, 99]], np.float32)


def _dct_matrix() -> np.ndarray:
  d = np.zeros((8, 8), np.float64)
  for k in range(8):
    for n in range(8):
      d[k, n] = (math.sqrt(1 / 8) if k == 0 else math.sqrt(2 / 8)) * math.cos(
          math.pi * (2 * n + 1) * k / 16)
  return d.astype(np.float32)


def quality_tables(quality: Array) -> tuple[Array, Array]:
  """IJG scaling of the standard tables: quality [B] in [1, 100] -> two [B, 8, 8] tables."""
  q = jnp.clip(jnp.asarray(quality, jnp.float32), 1.0, 100.0)
  scale = jnp.where(q < 50, 5000.0 / q, 200.0 - 2.0 * q)[:, None, None]
  make = lambda t: jnp.clip(jnp.floor((t[None] * scale + 50.0) / 100.0), 1.0, 255.0)  # noqa: E731
  return make(jnp.asarray(_JPEG_LUMA)), make(jnp.asarray(_JPEG_CHROMA))


def _quantize_plane(plane: Array, table: Array) -> Array:
  """8x8-block DCT quantisation of [B, H, W] (values 0..255) with per-example tables."""
  b, h, w = plane.shape
  ph, pw = -h % 8, -w % 8
  x = jnp.pad(plane, ((0, 0), (0, ph), (0, pw)), mode='edge') - 128.0
  hh, ww = x.shape[1] // 8, x.shape[2] // 8
  blocks = x.reshape(b, hh, 8, ww, 8).transpose(0, 1, 3, 2, 4)
  d = jnp.asarray(_dct_matrix())
  coef = jnp.einsum('ij,bxyjk,lk->bxyil', d, blocks, d)
  t = table[:, None, None]
  coef = jnp.round(coef / t) * t
  blocks = jnp.einsum('ji,bxyjk,kl->bxyil', d, coef, d)
  x = blocks.transpose(0, 1, 3, 2, 4).reshape(b, hh * 8, ww * 8) + 128.0
  return x[:, :h, :w]


def jpeg_compress(images: Array, quality) -> Array:
  """Baseline JPEG's lossy steps on [B, H, W, 3] in [-1, 1]; quality scalar or [B]."""
  b, h, w, _ = images.shape
  quality = jnp.broadcast_to(jnp.asarray(quality, jnp.float32), (b,))
  x = (jnp.clip(images, -1.0, 1.0) + 1.0) * 127.5
  r, g, bl = x[..., 0], x[..., 1], x[..., 2]
  y = 0.299 * r + 0.587 * g + 0.114 * bl
  cb = 128.0 - 0.168736 * r - 0.331264 * g + 0.5 * bl
  cr = 128.0 + 0.5 * r - 0.418688 * g - 0.081312 * bl
  luma_t, chroma_t = quality_tables(quality)
  y = _quantize_plane(y, luma_t)

  def chroma(c):
    if h % 2 or w % 2:
      return _quantize_plane(c, chroma_t)
    small = c.reshape(b, h // 2, 2, w // 2, 2).mean(axis=(2, 4))
    small = _quantize_plane(small, chroma_t)
    # libjpeg's "fancy" upsampling: linear interpolation between chroma sample centres.
    return jax.image.resize(small, (b, h, w), method='linear')

  cb, cr = chroma(cb) - 128.0, chroma(cr) - 128.0
  rgb = jnp.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], -1)
  rgb = jnp.round(jnp.clip(rgb, 0.0, 255.0))
  return rgb / 127.5 - 1.0


def bsr_degradation(rng: Array, images: Array, low_res: int, *,
                    blur_sigma: tuple[float, float] = (0.1, 2.4), blur_size: int = 7,
                    noise_sigma: tuple[float, float] = (1.0 / 255, 25.0 / 255),
                    jpeg_quality: tuple[float, float] = (30.0, 95.0)) -> Array:
  """The second upsampler's conditioning (BSR-style, see the module docstring).

  Per example: anisotropic Gaussian blur (sigmas in `blur_sigma` pixels of the high-res
  image, random angle, `blur_size` taps), downsampling to `low_res` with a random kernel
  (area, antialiased bilinear or bicubic), additive Gaussian noise with std uniform in
  `noise_sigma` (in [0, 1] pixel units), JPEG with quality uniform in `jpeg_quality`.
  """
  b = images.shape[0]
  ks = jax.random.split(rng, 6)
  sx = jax.random.uniform(ks[0], (b,), minval=blur_sigma[0], maxval=blur_sigma[1])
  sy = jax.random.uniform(ks[1], (b,), minval=blur_sigma[0], maxval=blur_sigma[1])
  theta = jax.random.uniform(ks[2], (b,), maxval=math.pi)
  kernels = jax.vmap(lambda a, c, t: anisotropic_kernel(a, c, t, blur_size))(sx, sy, theta)
  x = jax.vmap(lambda img, k: _depthwise(img[None], k)[0])(images, kernels)
  candidates = jnp.stack([area_downsample(x, low_res), resize(x, low_res, 'linear'),
                          resize(x, low_res, 'bicubic')])
  method = jax.random.randint(ks[3], (b,), 0, candidates.shape[0])
  x = jnp.take_along_axis(candidates, method[None, :, None, None, None], axis=0)[0]
  sigma = jax.random.uniform(ks[4], (b, 1, 1, 1), minval=noise_sigma[0],
                             maxval=noise_sigma[1])
  x = x + 2.0 * sigma * jax.random.normal(ks[5], x.shape)   # [-1, 1] is twice [0, 1]
  quality = jax.random.uniform(jax.random.fold_in(rng, 7), (b,), minval=jpeg_quality[0],
                               maxval=jpeg_quality[1])
  return jpeg_compress(x, quality)


DEGRADATIONS = ('blur', 'bsr', 'none')


def degrade(rng: Array, images: Array, low_res: int, kind: str) -> Array:
  """The conditioning image of an upsampler trained with degradation `kind`."""
  if kind == 'blur':
    return blur_degradation(images, low_res)
  if kind == 'bsr':
    return bsr_degradation(rng, images, low_res)
  if kind == 'none':
    return jnp.clip(resize(images, low_res, 'bicubic'), -1.0, 1.0)
  raise ValueError(f'Unknown upsampler degradation {kind!r}; choose one of {DEGRADATIONS} '
                   '(config field degradation).')


def noise_augment(rng: Array, diffusion, low_res: Array, max_level: float
                  ) -> tuple[Array, Array]:
  """Noises the low-res image with the upsampler's own diffusion at a random level.

  The level is a timestep uniform in [0, max_level * T) (max_level in [0, 1]); returns
  (noised low_res, level int32 [B]) and the model is given the level.
  """
  b = low_res.shape[0]
  k1, k2 = jax.random.split(rng)
  top = max(1, int(round(max_level * diffusion.timesteps)))
  level = jax.random.randint(k1, (b,), 0, top, dtype=jnp.int32)
  noised = diffusion.q_sample(low_res, level, jax.random.normal(k2, low_res.shape))
  return noised, level
