"""Image decoding: formats, colour modes and every kind of bad file."""

import io
import json
import os
import struct
import zlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top
from PIL import Image  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from paligemma import tokenizer  # pylint: disable=g-import-not-at-top
from paligemma.data import images  # pylint: disable=g-import-not-at-top
from paligemma.data import pipeline  # pylint: disable=g-import-not-at-top


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


# --- Fidelity to big_vision's `decode|resize(R, antialias=...)|value_range(-1, 1)`. ---


def _big_vision_pp(data, size, antialias):
  """float32[size, size, 3]: big_vision's three pp ops, called as it calls the TF ops.

  decode: tf.io.decode_image(channels=3, expand_animations=False). resize: the bilinear
  float result clipped to the input dtype's range and cast back to it (uint8, so
  truncated). value_range(-1, 1): (x - in_min) / (in_max - in_min) * (vmax - vmin) + vmin
  in float32.
  """
  image = tf.io.decode_image(data, channels=3, expand_animations=False)
  resized = tf.image.resize(image, (size, size), method="bilinear", antialias=antialias)
  image = tf.cast(tf.clip_by_value(resized, tf.uint8.min, tf.uint8.max), image.dtype)
  in_min, in_max = tf.constant(0, tf.float32), tf.constant(255.0, tf.float32)
  x = (tf.cast(image, tf.float32) - in_min) / (in_max - in_min)
  return (-1 + x * (1 - -1)).numpy()


def _photo(height, width, seed, gray=False):
  """uint8[H, W, 3] (or [H, W]) smooth gradients plus noise: compresses like a photo."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:height, 0:width]
  base = np.stack([xx * rng.uniform(0.2, 0.5), yy * rng.uniform(0.2, 0.6),
                   (xx + yy) * rng.uniform(0.1, 0.3)], -1)
  pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
  return pixels[..., 0] if gray else pixels


def _test_files():
  """{name: encoded bytes} of the formats and modes TF decodes (big_vision's path)."""
  return {
      "q90.jpg": _encode(Image.fromarray(_photo(375, 500, 0)), "JPEG", quality=90),
      "q75.jpg": _encode(Image.fromarray(_photo(457, 300, 1)), "JPEG", quality=75),
      "q95_big.jpg": _encode(Image.fromarray(_photo(600, 800, 2)), "JPEG", quality=95),
      "gray.jpg": _encode(Image.fromarray(_photo(200, 260, 3, gray=True)), "JPEG"),
      "cmyk.jpg": _encode(Image.fromarray(_photo(150, 180, 4)).convert("CMYK"), "JPEG"),
      "photo.png": _encode(Image.fromarray(_photo(240, 320, 5)), "PNG"),
      "photo.gif": _encode(Image.fromarray(_photo(120, 160, 6)), "GIF"),
  }


def _jsonl(folder, files):
  lines = []
  for name, data in files.items():
    (folder / name).write_bytes(data)
    lines.append(json.dumps({"image": name, "prefix": "caption en", "id": name}))
  (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
  return {"name": "jsonl", "path": str(folder / "data.jsonl")}


def _pipeline_images(source, size, antialias):
  """float32[N, size, size, 3] of every example of `source`, through make_eval_input."""
  inp = pipeline.make_eval_input(source, tokenizer.load_tokenizer(), image_size=size,
                                 text_len=8, batch_size=8, process_index=0,
                                 process_count=1, antialias=antialias)
  batch = next(iter(inp))
  assert batch["valid"][:inp.num_examples].all()
  return batch["image"][:inp.num_examples]


def test_decode_is_tf_decode_image():
  for name, data in _test_files().items():
    assert images.tf_decodes(Image.open(io.BytesIO(data))), name
    expected = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
    assert np.array_equal(images.decode(data), expected), name


@pytest.mark.parametrize("size", [224, 448])
@pytest.mark.parametrize("antialias", [True, False])
def test_pipeline_is_bit_identical_to_big_vision(tmp_path, size, antialias):
  files = _test_files()
  got = _pipeline_images(_jsonl(tmp_path, files), size, antialias)
  for row, (name, data) in zip(got, files.items()):
    expected = _big_vision_pp(data, size, antialias)
    assert row.dtype == np.float32 and row.shape == expected.shape, name
    assert np.array_equal(row, expected), (name, np.abs(row - expected).max())


def test_resize_and_scale_every_value():
  """Each uint8 value maps to big_vision's value_range float32, bit for bit."""
  values = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
  got = images.resize_and_scale(tf.constant(values), (16, 16)).numpy()
  x = values.astype(np.float32) / np.float32(255)
  assert np.array_equal(got, np.float32(-1) + x * np.float32(2))
  assert got.min() == -1 and got.max() == 1


def _fallback_files():
  """{name: (encoded bytes, the RGB PIL decodes it to)}: images TF must not decode."""
  rgba = _photo(64, 48, 7).copy()
  alpha = np.tile(np.linspace(0, 255, 48).astype(np.uint8), (64, 1))
  rgba_png = _encode(Image.fromarray(np.dstack([rgba, alpha]), "RGBA"), "PNG")
  pal = Image.fromarray(_photo(40, 30, 8)).quantize(16)
  pal_bmp = _encode(pal, "BMP")  # TF's BMP decoder would return the palette indices.
  pal_trns = pal.copy()
  pal_trns.info["transparency"] = 3
  webp = _encode(Image.fromarray(_photo(50, 70, 9)), "WEBP", lossless=True)
  white = np.full((64, 48, 3), 255.0)
  a = alpha[..., None] / 255.0
  composited = np.round(rgba * a + white * (1 - a)).astype(np.uint8)
  return {
      "alpha.png": (rgba_png, composited),
      "palette.bmp": (pal_bmp, np.asarray(pal.convert("RGB"))),
      "palette_trns.png": (_encode(pal_trns, "PNG", transparency=3), None),
      "lossless.webp": (webp, _photo(50, 70, 9)),
  }


@pytest.mark.parametrize("antialias", [True, False])
def test_fallback_images_decoded_by_pil_resized_as_big_vision(tmp_path, antialias):
  files = _fallback_files()
  for name, (data, expected) in files.items():
    assert not images.tf_decodes(Image.open(io.BytesIO(data))), name
    if expected is not None:
      assert np.abs(images.decode(data).astype(int) - expected).max() <= 1, name
  # Palette index 3 is transparent: those pixels are white, the others the palette's.
  pal_trns = Image.open(io.BytesIO(files["palette_trns.png"][0]))
  index, rgb = np.asarray(pal_trns), np.asarray(pal_trns.convert("RGB"))
  out = images.decode(files["palette_trns.png"][0])
  assert (out[index == 3] == 255).all() and np.array_equal(out[index != 3], rgb[index != 3])
  got = _pipeline_images(_jsonl(tmp_path, {k: v[0] for k, v in files.items()}), 224,
                         antialias)
  for row, name in zip(got, files):
    pixels = images.decode(files[name][0])
    expected = _big_vision_pp(_encode(Image.fromarray(pixels), "PNG"), 224, antialias)
    assert np.array_equal(row, expected), name


def test_bomb_refused_before_tf_sees_the_bytes(monkeypatch):
  calls = []
  monkeypatch.setattr(images.tf.io, "decode_image", lambda *a, **k: calls.append(a))
  with pytest.raises(images.ImageError, match="decompression bomb"):
    images.decode(_png_header_only(30_000, 30_000))
  jpeg = _encode(Image.fromarray(_photo(30, 40, 0)), "JPEG")
  with pytest.raises(images.ImageError, match="40x30 pixels"):
    images.decode(jpeg, max_pixels=1199)
  assert not calls


def test_jpeg_tf_refuses_then_pil_names_the_file(tmp_path, monkeypatch):
  tried = []
  tf_decode_image = tf.io.decode_image
  def spy(*args, **kw):
    tried.append(True)
    return tf_decode_image(*args, **kw)
  monkeypatch.setattr(images.tf.io, "decode_image", spy)
  data = bytearray(_encode(Image.fromarray(_photo(64, 64, 0)), "JPEG"))
  data[-300:] = b"\x00" * 300  # Zeroed entropy-coded data, then no end marker.
  path = tmp_path / "zeros.jpg"
  path.write_bytes(bytes(data[:-2]))
  with pytest.raises(images.ImageError, match="zeros.jpg.*cannot be decoded"):
    images.decode(str(path))
  assert tried  # TF refused it first; PIL's reason is the one reported.
