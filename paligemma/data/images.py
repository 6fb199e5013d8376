"""Images as big_vision reads them: `decode` -> uint8[H, W, 3], `resize_and_scale` -> [-1, 1].

JPEG, PNG, GIF (first frame) and BMP are decoded by TensorFlow's own decoders,
`tf.io.decode_image(data, channels=3, expand_animations=False)`, exactly as big_vision's
`decode` pp op (used by its PaliGemma transfer configs): PIL's JPEG decoder differs from
TF's by about 1 level on average and up to about 5. TF also reads CMYK JPEGs and 16-bit
PNGs (keeping the high byte), so those too are decoded as big_vision decodes them.

PIL decodes the rest: other formats (WebP, TIFF, ...), palette BMPs (TF's BMP decoder
ignores the palette), files TF refuses, and images with alpha (RGBA, LA, palette or
grayscale with transparency), which are composited onto white as transformers'
`convert_to_rgb` does (TF would keep the colour under transparent pixels, often black).
16-bit and 32-bit integer images read by PIL are scaled from 0..65535 to 0..255. EXIF
orientation is not applied (neither does tf.io.decode_image), so pixel coordinates stay
those of the file (what COCO boxes refer to).

Every failure (missing file, not an image, truncated data, too many pixels) raises
`ImageError` naming the image, so callers choose between skipping and stopping.
"""

import io
import os
import warnings

import numpy as np
from PIL import Image
import tensorflow as tf

# PIL's own default (about 89.5 M pixels), enforced as a hard limit: larger files are
# refused before their pixels are decoded, so a crafted file cannot exhaust memory.
MAX_PIXELS = 89_478_485

# Formats big_vision's `decode` reads (PIL names camera JPEGs with extra frames "MPO").
TF_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "BMP")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageError(ValueError):
  """An image could not be read; the message names it and the reason."""


def describe(image):
  """Short human name of an image given as a path, bytes or an array."""
  if isinstance(image, (str, os.PathLike)):
    return os.fspath(image)
  if isinstance(image, (bytes, bytearray)):
    return f"<{len(image)} bytes>"
  return f"<array {getattr(image, 'shape', '?')}>"


def decode(image, max_pixels=MAX_PIXELS):
  """uint8[H, W, 3] RGB from a path, encoded bytes or an array (HW, HW1, HW3 or HW4)."""
  if isinstance(image, np.ndarray):
    return _from_array(image)
  name = describe(image)
  try:
    data = _read(image)
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      with Image.open(io.BytesIO(data)) as img:
        # Only the header is parsed so far: refuse huge images before any decoder runs.
        if img.width * img.height > max_pixels:
          raise ImageError(f"Image {name} has {img.width}x{img.height} pixels, more than the "
                           f"limit {max_pixels} (possible decompression bomb); refused.")
        if tf_decodes(img):
          pixels = _tf_decode(data)
          if pixels is not None:
            return pixels
        # PIL also reports why a file TF refused is unreadable (truncated, corrupt, ...).
        img.load()
        return _to_rgb(img)
  except ImageError:
    raise
  except FileNotFoundError:
    raise ImageError(f"Image file {name} not found.") from None
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
          Image.DecompressionBombWarning) as e:
    # PIL reports unreadable data as UnidentifiedImageError (an OSError), truncated
    # data as OSError, and some corrupt headers as ValueError or SyntaxError.
    raise ImageError(f"Image {name} cannot be decoded: {type(e).__name__}: {e}") from None


def _read(image):
  """bytes of a path or of encoded bytes."""
  if isinstance(image, (str, os.PathLike)):
    with open(image, "rb") as f:
      return f.read()
  return bytes(image)


def tf_decodes(img):
  """Whether TF decodes this (lazily opened) PIL image, as big_vision would."""
  if img.format not in TF_FORMATS:
    return False
  if img.mode in _ALPHA_MODES or "transparency" in img.info:
    return False  # Composited onto white by PIL instead.
  return img.format != "BMP" or img.mode == "RGB"  # TF ignores BMP palettes.


def _tf_decode(data):
  """uint8[H, W, 3] from TF's decoders, or None where TF refuses the data."""
  try:
    return tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
  except tf.errors.OpError:  # Corrupt or unsupported data: PIL reads it or says why not.
    return None


def _to_rgb(img):
  """uint8[H, W, 3] of a loaded PIL image of any mode."""
  mode = img.mode
  if mode == "RGB":
    return np.asarray(img, np.uint8)
  if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
    values = np.asarray(img).astype(np.float64)
    gray = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)
  if mode in _ALPHA_MODES or "transparency" in img.info:
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    white.alpha_composite(rgba)
    return np.asarray(white.convert("RGB"), np.uint8)
  return np.asarray(img.convert("RGB"), np.uint8)  # L, 1, P, CMYK, YCbCr, LAB, HSV.


def _from_array(array):
  """uint8[H, W, 3] from uint8[H, W], [H, W, 1], [H, W, 3] or [H, W, 4] (alpha on white)."""
  if array.dtype != np.uint8:
    raise ImageError(f"Image array must be uint8, got {array.dtype}; convert it first.")
  if array.ndim == 2:
    array = array[..., None]
  if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
    raise ImageError(f"Image array must be [H, W], [H, W, 1|3|4], got shape {array.shape}.")
  if array.shape[-1] == 1:
    return np.repeat(array, 3, axis=-1)
  if array.shape[-1] == 4:
    return _to_rgb(Image.fromarray(array, "RGBA"))
  return array


def resize_and_scale(image, size, antialias=True):
  """TF graph op: uint8[H, W, 3] -> float32[size[0], size[1], 3] in [-1, 1].

  big_vision's `resize(size, antialias=...)|value_range(-1, 1)`, bit for bit: the
  bilinear resize returns the input's dtype, so its float result is clipped to 0..255
  and truncated to uint8 (tf.cast rounds toward zero) before x / 255 * 2 - 1; the
  released checkpoints saw these quantised pixels.
  """
  resized = tf.image.resize(image, size, method="bilinear", antialias=antialias)
  pixels = tf.cast(tf.clip_by_value(resized, 0.0, 255.0), tf.uint8)
  return tf.cast(pixels, tf.float32) / 255.0 * 2.0 - 1.0
