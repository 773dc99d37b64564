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


def to_model_input(images: jax.Array, image_size: int) -> jax.Array:
  """`[B, 8, 8]` in [0, 1] -> `[B, image_size, image_size, 1]`, bilinear, normalized."""
  resized = jax.image.resize(images, (images.shape[0], image_size, image_size),
                             method="bilinear")
  return ((resized - PIXEL_MEAN) / PIXEL_STD)[..., None]


def random_shift(key: jax.Array, images: jax.Array, max_shift: int = 1) -> jax.Array:
  """Shift each `[8, 8]` image by up to `max_shift` pixels each way (zero fill).

  The only augmentation: with ~1400 training images a ViT otherwise memorizes.
  """
  pad = max_shift
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad)))
  offsets = jax.random.randint(key, (images.shape[0], 2), 0, 2 * pad + 1)
  crop = lambda img, off: jax.lax.dynamic_slice(img, (off[0], off[1]), images.shape[1:])
  return jax.vmap(crop)(padded, offsets)
