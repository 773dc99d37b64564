"""scikit-learn's handwritten digits as ViT input: a fixed split, on-device resizing.

`load_digits` ships 1797 8x8 grayscale images (0..16) inside scikit-learn, so
nothing is downloaded. The split is stratified and seeded, so `vit_train.py` and
`vit_inference.py` agree on which images are held out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

NUM_CLASSES = 10
HELD_OUT_FRACTION = 0.2
# Mean and spread of the pixel values scaled to [0, 1].
PIXEL_MEAN, PIXEL_STD = 0.30, 0.40


def split(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """train images `[N, 8, 8]` float32 in [0, 1], train labels `[N]`, held-out ditto."""
  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)
  labels = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = train_test_split(
      images, labels, test_size=HELD_OUT_FRACTION, stratify=labels,
      random_state=seed)
  return x_train, y_train, x_test, y_test


def to_model_input(images: jax.Array, image_size: int,
                   key: jax.Array | None = None) -> jax.Array:
  """`[B, 8, 8]` in [0, 1] -> `[B, image_size, image_size, 1]`, normalized.

  Bilinear upsampling (zeros outside the 8x8 image). With `key`, each image
  first gets a random affine map: scale 0.9-1.1, rotation up to 10 degrees,
  shift up to 1 pixel each way. That is the augmentation: with ~1400 training
  images a ViT otherwise memorizes them.
  """
  n, side = images.shape[0], images.shape[1]
  # Source coordinates of the output pixel centres (pixel centres at integers).
  axis = (jnp.arange(image_size) + 0.5) * (side / image_size) - 0.5
  rows, cols = jnp.meshgrid(axis, axis, indexing="ij")
  rows = jnp.broadcast_to(rows, (n, image_size, image_size))
  cols = jnp.broadcast_to(cols, rows.shape)
  if key is not None:
    k_scale, k_angle, k_shift = jax.random.split(key, 3)
    scale = jax.random.uniform(k_scale, (n, 1, 1), minval=0.9, maxval=1.1)
    angle = jax.random.uniform(k_angle, (n, 1, 1), minval=-1, maxval=1) * jnp.pi / 18
    shift = jax.random.uniform(k_shift, (2, n, 1, 1), minval=-1.0, maxval=1.0)
    center = (side - 1) / 2
    r, c = rows - center - shift[0], cols - center - shift[1]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    rows = (cos * r + sin * c) / scale + center               # the inverse map
    cols = (-sin * r + cos * c) / scale + center
  sample = lambda img, r, c: jax.scipy.ndimage.map_coordinates(
      img, [r, c], order=1, mode="constant", cval=0.0)
  resized = jax.vmap(sample)(images, rows, cols)
  return ((resized - PIXEL_MEAN) / PIXEL_STD)[..., None]
