"""Image decoding: formats, colour modes and every kind of bad file."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from paligemma.data import images


def _encode(img, fmt, **kw):
  buf = io.BytesIO()
  img.save(buf, fmt, **kw)
  return buf.getvalue()


def _png_header_only(width, height):
  """A PNG whose header claims width x height pixels, with one tiny data chunk."""
  def chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
          + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP"])
def test_formats_decode_to_rgb_uint8(fmt):
  pixels = np.zeros((6, 8, 3), np.uint8)
  pixels[:, :4] = (200, 40, 40)
  out = images.decode(_encode(Image.fromarray(pixels), fmt))
  assert out.shape == (6, 8, 3) and out.dtype == np.uint8
  assert np.abs(out[1, 1].astype(int) - [200, 40, 40]).max() < 30  # Lossy formats: near.
  assert np.abs(out[1, 6].astype(int)).max() < 30


def test_path_input(tmp_path):
  path = tmp_path / "x.png"
  Image.new("RGB", (3, 2), (1, 2, 3)).save(path)
  assert images.decode(str(path)).tolist() == [[[1, 2, 3]] * 3] * 2
  assert images.decode(path).shape == (2, 3, 3)


def test_grayscale_and_palette():
  gray = images.decode(_encode(Image.new("L", (2, 2), 77), "PNG"))
  assert gray.tolist() == [[[77, 77, 77]] * 2] * 2
  pal = Image.new("P", (2, 2), 1)
  pal.putpalette([0, 0, 0, 10, 220, 30] + [0] * 762)
  assert images.decode(_encode(pal, "PNG"))[0, 0].tolist() == [10, 220, 30]


def test_alpha_is_composited_on_white():
  rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 255))
  rgba.putpixel((1, 0), (0, 0, 255, 0))  # Fully transparent blue -> white.
  assert images.decode(_encode(rgba, "PNG")).tolist() == [[[255, 0, 0], [255, 255, 255]]]
  half = Image.new("LA", (1, 1), (0, 128))
  assert images.decode(_encode(half, "PNG")).tolist() == [[[127, 127, 127]]]


def test_cmyk_jpeg():
  cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # Pure red in CMYK.
  out = images.decode(_encode(cmyk, "JPEG", quality=95))
  assert out.shape == (8, 8, 3)
  assert np.abs(out[4, 4].astype(int) - [255, 0, 0]).max() < 20


def test_16_bit_png_is_scaled():
  values = np.array([[0, 257 * 100, 65535]], np.uint16)
  data = _encode(Image.fromarray(values), "PNG")
  assert Image.open(io.BytesIO(data)).mode.startswith("I")  # Really 16-bit on disk.
  assert images.decode(data).tolist() == [[[0] * 3, [100] * 3, [255] * 3]]


def test_arrays():
  assert images.decode(np.full((2, 2), 9, np.uint8)).tolist() == [[[9] * 3] * 2] * 2
  rgba = np.zeros((1, 1, 4), np.uint8)
  assert images.decode(rgba).tolist() == [[[255, 255, 255]]]
  with pytest.raises(images.ImageError, match="uint8"):
    images.decode(np.zeros((2, 2, 3), np.float32))
  with pytest.raises(images.ImageError, match="shape"):
    images.decode(np.zeros((2, 2, 2), np.uint8))


def test_truncated_jpeg(tmp_path):
  noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
  data = _encode(Image.fromarray(noise), "JPEG")
  path = tmp_path / "cut.jpg"
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(images.ImageError, match="cut.jpg"):
    images.decode(str(path))


def test_text_file_named_jpg(tmp_path):
  path = tmp_path / "notes.jpg"
  path.write_text("this is not an image\n")
  with pytest.raises(images.ImageError, match="notes.jpg.*cannot be decoded"):
    images.decode(str(path))


def test_missing_and_empty_files(tmp_path):
  with pytest.raises(images.ImageError, match="missing.png not found"):
    images.decode(str(tmp_path / "missing.png"))
  empty = tmp_path / "empty.png"
  empty.write_bytes(b"")
  with pytest.raises(images.ImageError, match="empty.png"):
    images.decode(str(empty))


def test_decompression_bomb_refused_before_decoding():
  with pytest.raises(images.ImageError, match="decompression bomb"):
    images.decode(_png_header_only(30_000, 30_000))  # 900 M pixels claimed.
  small = _encode(Image.new("RGB", (20, 20)), "PNG")
  with pytest.raises(images.ImageError, match="20x20 pixels"):
    images.decode(small, max_pixels=399)
  assert images.decode(small, max_pixels=400).shape == (20, 20, 3)
