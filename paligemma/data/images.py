"""Image decoding with PIL: any common file or array -> uint8[H, W, 3] RGB.

Reads JPEG, PNG, GIF (first frame), BMP, and whatever else PIL opens. Colour handling:
grayscale, palette and CMYK are converted to RGB; alpha (RGBA, LA, palette with
transparency) is composited onto white, as transformers' `convert_to_rgb` does;
16-bit and 32-bit integer images are scaled from 0..65535 to 0..255. EXIF orientation
is not applied, as in tf.io.decode_image, so pixel coordinates stay those of the file
(what COCO boxes refer to).

Every failure (missing file, not an image, truncated data, too many pixels) raises
`ImageError` naming the image, so callers choose between skipping and stopping.
"""

import io
import os
import warnings

import numpy as np
from PIL import Image

# PIL's own default (about 89.5 M pixels), enforced as a hard limit: larger files are
# refused before their pixels are decoded, so a crafted file cannot exhaust memory.
MAX_PIXELS = 89_478_485


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
    if isinstance(image, (str, os.PathLike)):
      with open(image, "rb") as f:
        data = f.read()
    else:
      data = bytes(image)
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      with Image.open(io.BytesIO(data)) as img:
        # The header is parsed, the pixels not yet: check the size before decoding.
        if img.width * img.height > max_pixels:
          raise ImageError(f"Image {name} has {img.width}x{img.height} pixels, more than the "
                           f"limit {max_pixels} (possible decompression bomb); refused.")
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


def _to_rgb(img):
  mode = img.mode
  if mode == "RGB":
    return np.asarray(img, np.uint8)
  if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
    values = np.asarray(img).astype(np.float64)
    gray = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)
  if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    white.alpha_composite(rgba)
    return np.asarray(white.convert("RGB"), np.uint8)
  return np.asarray(img.convert("RGB"), np.uint8)  # L, 1, P, CMYK, YCbCr, LAB, HSV.


def _from_array(array):
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
