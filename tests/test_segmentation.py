"""The mask VQ-VAE and `<seg>` strings against an independent PyTorch reference of the AiT
layout, loaded from the same state dict (released npz layout) with load_state_dict."""

import functools
import re

import numpy as np
import pytest
import tensorflow as tf
import torch
from torch import nn

from paligemma import segmentation as seg
from paligemma import tokenizer as tokenizer_lib

DIM = 32  # Small codebook dim for speed; the released file has D = 512.


class _ResBlock(nn.Module):

  def __init__(self, channels=128):
    super().__init__()
    self.net = nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
        nn.Conv2d(channels, channels, 1))

  def forward(self, x):
    return x + self.net(x)


class _VQ(nn.Module):

  def __init__(self, codebook_size, dim):
    super().__init__()
    self._embedding = nn.Parameter(torch.zeros(codebook_size, dim))


class _TorchVAE(nn.Module):
  """AiT's mask VAE: module indices give the released key names."""

  def __init__(self, codebook_size, dim):
    super().__init__()
    # TF 'SAME' with k=4, s=2 on an even input pads 1 on each side: padding=1 here.
    down = lambda i, o: [nn.Conv2d(i, o, 4, stride=2, padding=1), nn.ReLU()]
    up = lambda i, o: [nn.ConvTranspose2d(i, o, 4, stride=2, padding=1), nn.ReLU()]
    self.encoder = nn.Sequential(
        *down(1, 16), *down(16, 32), *down(32, 64), *down(64, 128),
        _ResBlock(), _ResBlock(), nn.Conv2d(128, dim, 1))
    self.decoder = nn.Sequential(
        nn.Conv2d(dim, 128, 1), nn.ReLU(), _ResBlock(), _ResBlock(),
        *up(128, 128), *up(128, 64), *up(64, 32), *up(32, 16), nn.Conv2d(16, 1, 1))
    self._vq_vae = _VQ(codebook_size, dim)

  @torch.no_grad()
  def encode(self, masks):
    """int[B, 16] of float[B, 64, 64] masks in [0, 1]."""
    x = torch.from_numpy(np.asarray(masks, np.float32))[:, None]
    z = self.encoder(2 * (x - 0.5))  # [B, D, 4, 4]
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    e = self._vq_vae._embedding
    d = (flat**2).sum(1, keepdim=True) + (e**2).sum(1) - 2 * flat @ e.T
    return d.argmin(1).reshape(-1, 16).numpy()

  @torch.no_grad()
  def decode(self, codes):
    """float[B, 64, 64] of int[B, 16] codes."""
    e = self._vq_vae._embedding[torch.from_numpy(np.asarray(codes, np.int64))]  # [B, 16, D]
    x = e.reshape(-1, 4, 4, e.shape[-1]).permute(0, 3, 1, 2)
    return self.decoder(x)[:, 0].numpy()


@functools.lru_cache(maxsize=None)
def _setup():
  state = seg.random_state_dict(seed=0, codebook_size=128, dim=DIM)
  reference = _TorchVAE(128, DIM)
  reference.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
  return state, seg.vae_from_state_dict(state), reference


@pytest.fixture(name="vae_file")
def _vae_file(tmp_path):
  path = tmp_path / "vae.npz"
  np.savez(path, **_setup()[0])
  return path


def _rectangle_mask():
  """uint8[60, 80] 0/255 mask with a rectangle at rows 12:42, columns 20:64."""
  mask = np.zeros((60, 80), np.uint8)
  mask[12:42, 20:64] = 255
  return mask


@pytest.mark.torch
def test_encode_decode_match_torch_reference(vae_file):
  _, _, reference = _setup()
  vae = seg.load_vae(vae_file)
  assert (vae.codebook_size, vae.dim) == (128, DIM)
  masks = seg.random_blobs(np.random.default_rng(1), 6)
  masks[-1] = np.random.default_rng(2).uniform(size=(64, 64))  # Soft values too.
  codes = np.asarray(seg.encode_masks(vae, masks))
  assert codes.dtype == np.int32 and codes.shape == (6, 16)
  np.testing.assert_array_equal(codes, reference.encode(masks))
  assert len(np.unique(codes)) > 20  # The random VAE does not collapse to one code.

  codes = np.random.default_rng(3).integers(0, 128, (5, 16), dtype=np.int32)
  decoded = np.asarray(seg.decode_codes(vae, codes))
  assert decoded.dtype == np.float32 and decoded.shape == (5, 64, 64)
  assert decoded.std() > 0.1  # Else the tolerance below would prove little.
  np.testing.assert_allclose(decoded, reference.decode(codes), atol=1e-4, rtol=0)


def _tf_encoder_features(state, masks):
  """float[B, 4, 4, D]: the encoder as big_vision's TF preprocessing writes it (OIHW ->
  HWIO kernels, tf.nn.conv2d 'SAME'), a check that 'SAME' stride 2 = PyTorch padding 1."""
  def conv(x, name, stride=1):
    kernel = np.transpose(state[name + ".weight"], (2, 3, 1, 0))
    return tf.nn.conv2d(x, kernel, strides=stride, padding="SAME") + state[name + ".bias"]

  x = 2.0 * (tf.constant(masks[..., None]) - 0.5)
  for i in range(4):
    x = tf.nn.relu(conv(x, f"encoder.{2 * i}", stride=2))
  for block in ("encoder.8.net", "encoder.9.net"):
    y = tf.nn.relu(conv(x, block + ".0"))
    y = tf.nn.relu(conv(y, block + ".2"))
    x = x + conv(y, block + ".4")
  return conv(x, "encoder.10").numpy()


def test_encoder_matches_tf_same_padding():
  state, vae, _ = _setup()
  masks = seg.random_blobs(np.random.default_rng(4), 3)
  features = seg._encode_features(vae, masks)  # pylint: disable=protected-access
  np.testing.assert_allclose(np.asarray(features), _tf_encoder_features(state, masks),
                             atol=1e-4, rtol=1e-4)


def test_load_vae_names_missing_key(tmp_path):
  state = dict(_setup()[0])
  del state["decoder.6.bias"]
  path = tmp_path / "bad.npz"
  np.savez(path, **state)
  with pytest.raises(ValueError, match=r"bad\.npz.*missing key.*'decoder\.6\.bias'"):
    seg.load_vae(path)


def test_load_vae_names_wrong_shape(tmp_path):
  state = dict(_setup()[0])
  state["encoder.2.weight"] = np.zeros((32, 16, 3, 3), np.float32)
  path = tmp_path / "bad.npz"
  np.savez(path, **state)
  with pytest.raises(ValueError, match=r"'encoder\.2\.weight' has shape \(32, 16, 3, 3\), "
                     r"expected \(32, 16, 4, 4\)"):
    seg.load_vae(path)


def test_load_vae_missing_codebook_and_file(tmp_path):
  state = dict(_setup()[0])
  del state["_vq_vae._embedding"]
  np.savez(tmp_path / "x.npz", **state)
  with pytest.raises(ValueError, match="_vq_vae._embedding"):
    seg.load_vae(tmp_path / "x.npz")
  with pytest.raises(FileNotFoundError, match="vae-oid.npz"):
    seg.load_vae(tmp_path / "absent.npz")


def test_decode_codes_rejects_out_of_range():
  with pytest.raises(ValueError, match=r"\[0, 128\)"):
    seg.decode_codes(_setup()[1], np.full((1, 16), 128))


@pytest.mark.torch
def test_mask_to_suffix_matches_hand_computed_reference():
  _, vae, reference = _setup()
  mask = _rectangle_mask()
  box = (0.2, 0.25, 0.7, 0.8)  # y1, x1, y2, x2
  suffix = seg.mask_to_suffix(vae, mask, box)
  # round(1023 * v): 204.6 -> 205, 255.75 -> 256, 716.1 -> 716, 818.4 -> 818.
  locs = "<loc0205><loc0256><loc0716><loc0818>"
  assert suffix.startswith(locs)
  # Crop rows round(60 * .2):round(60 * .7) = 12:42, columns round(80 * .25):round(80 * .8)
  # = 20:64, i.e. exactly the rectangle.
  crop = mask[12:42, 20:64]
  resized = tf.image.resize(crop[None, :, :, None], [64, 64], method="bilinear",
                            antialias=True).numpy()[0, :, :, 0] / 255.0
  codes = reference.encode(resized[None])[0]
  assert suffix == locs + "".join(f"<seg{c:03d}>" for c in codes)
  assert " " not in suffix
  # bool and float [0, 1] masks give the same string; a 0/1 uint8 mask is refused.
  assert seg.mask_to_suffix(vae, mask > 0, box) == suffix
  assert seg.mask_to_suffix(vae, (mask > 0).astype(np.float32), box) == suffix
  with pytest.raises(ValueError, match="0/255"):
    seg.mask_to_suffix(vae, (mask > 0).astype(np.uint8), box)
  with pytest.raises(ValueError, match="covers no pixel"):
    seg.mask_to_suffix(vae, mask, (0.2, 0.25, 0.2, 0.8))


def test_mask_to_suffix_off_centre_crop():
  _, vae, _ = _setup()
  mask = _rectangle_mask()
  box = (0.1, 0.0, 0.9, 0.5)  # Rows 6:54, columns 0:40: a part of the rectangle.
  suffix = seg.mask_to_suffix(vae, mask, box)
  expected = seg.encode_masks(vae, seg.crop_and_resize(mask[6:54, 0:40], (0, 0, 1, 1))[None])
  assert suffix.endswith("".join(tokenizer_lib.seg_piece(c) for c in np.asarray(expected)[0]))


def test_parse_segmentation_round_trips_box():
  _, vae, _ = _setup()
  mask = _rectangle_mask()
  box = (0.2, 0.25, 0.7, 0.8)
  text = seg.mask_to_suffix(vae, mask, box) + " car"
  objects, invalid = seg.parse_segmentation(text, vae, 60, 80)
  assert invalid == 0 and len(objects) == 1
  obj = objects[0]
  assert obj["label"] == "car"
  np.testing.assert_allclose(obj["box"], box, atol=0.5 / 1023)
  assert obj["box"].dtype == np.float64
  # A random VAE reconstructs nothing meaningful: check only shape, dtype, placement.
  assert obj["mask"].shape == (60, 80) and obj["mask"].dtype == np.bool_
  y1, x1, y2, x2 = int(205 / 1023 * 60), int(256 / 1023 * 80), int(716 / 1023 * 60), int(
      818 / 1023 * 80)
  outside = obj["mask"].copy()
  outside[y1:y2, x1:x2] = False
  assert not outside.any()


def test_parse_segmentation_matches_decoder_and_pil():
  _, vae, reference = _setup()
  codes = np.arange(16) * 7
  text = "<loc0100><loc0200><loc0900><loc0800>" + "".join(f"<seg{c:03d}>" for c in codes)
  (obj,), invalid = seg.parse_segmentation(text, vae, 50, 40)
  assert invalid == 0 and obj["label"] == ""  # RefCOCO outputs carry no label.
  y1, x1, y2, x2 = int(100 / 1023 * 50), int(200 / 1023 * 40), int(900 / 1023 * 50), int(
      800 / 1023 * 40)
  logit = np.asarray(seg.decode_codes(vae, codes[None]))[0]
  from PIL import Image  # pylint: disable=g-import-not-at-top
  inside = np.asarray(Image.fromarray(logit).resize((x2 - x1, y2 - y1), Image.BILINEAR)) > 0
  assert 0 < inside.mean() < 1  # The random decoder gives a non-trivial mask.
  np.testing.assert_array_equal(obj["mask"][y1:y2, x1:x2], inside)
  assert obj["mask"].sum() == inside.sum()  # Nothing outside the box.


def test_parse_segmentation_counts_invalid_and_reads_two_objects():
  _, vae, _ = _setup()
  locs = "<loc0100><loc0200><loc0600><loc0700>"
  segs = "".join(f"<seg{i:03d}>" for i in range(16))
  good_a, good_b = locs + segs + " cat", "<loc0500><loc0000><loc1023><loc0400>" + segs + " dog"
  bad = [
      "<loc0100><loc0200><loc0600>" + segs + " three locs",
      locs + segs[:-8] + " fifteen segs",
      "<loc0600><loc0200><loc0100><loc0700>" + segs + " inverted",
      "junk",
      locs + "<seg200>" + segs[8:] + " code beyond the tokens",
      "<loc2000><loc0200><loc0600><loc0700>" + segs + " loc beyond the tokens",
  ]
  objects, invalid = seg.parse_segmentation(" ; ".join([good_a] + bad + [good_b]), vae, 32, 32)
  assert invalid == len(bad)
  assert [o["label"] for o in objects] == ["cat", "dog"]
  np.testing.assert_allclose(objects[1]["box"], [500 / 1023, 0, 1, 400 / 1023])
  assert seg.parse_segmentation("", vae, 32, 32) == ([], 0)
  # A box that vanishes once truncated to pixels is invalid too (as in big_vision).
  tiny = "<loc0100><loc0100><loc0101><loc0900>" + segs + " speck"
  assert seg.parse_segmentation(tiny, vae, 8, 8) == ([], 1)


def test_random_vae_shapes():
  vae = seg.random_vae(seed=1, codebook_size=128, dim=8)
  masks = seg.random_blobs(np.random.default_rng(0), 3)
  codes = seg.encode_masks(vae, masks)
  assert codes.shape == (3, 16) and codes.dtype == np.int32
  assert np.asarray(codes).min() >= 0 and np.asarray(codes).max() < 128
  decoded = seg.decode_codes(vae, codes)
  assert decoded.shape == (3, 64, 64) and decoded.dtype == np.float32
  with pytest.raises(ValueError, match=r"float32\[B, 64, 64\]"):
    seg.encode_masks(vae, masks[:, :32])
  assert re.fullmatch(r"(<loc\d{4}>){4}(<seg\d{3}>){16}",
                      seg.mask_to_suffix(vae, _rectangle_mask(), (0, 0, 1, 1)))
