"""Segmentation masks <-> `<segNNN>` tokens with big_vision's VQ-VAE (AiT, arXiv 2301.02229).

A mask inside a box is 16 codes, indices into the VAE's codebook (128 rows in the
released `vae-oid.npz`, one `<segNNN>` token each). The encoder maps a 64x64 crop of the
mask to a 4x4 grid of vectors, each replaced by its nearest codebook row; the decoder maps
the 4x4 grid of codebook rows back to a 64x64 mask logit (> 0 is inside).

The file is a PyTorch state dict saved with numpy (PyTorch names and layouts): Conv2d
weights OIHW, ConvTranspose2d weights (in, out, kh, kw), codebook `_vq_vae._embedding`
float32[K, D]. `load_vae` checks every array and converts it once to the HWIO kernels
that `jax.lax.conv_general_dilated` takes.

What follows big_vision exactly (checked against
`big_vision/pp/proj/paligemma/segmentation.py` and
`big_vision/evaluators/proj/paligemma/transfers/segmentation.py`):
- `encode_masks` takes masks in [0, 1] and maps them to [-1, 1] itself (big_vision's
  `encode_to_codebook_indices` applies `2 * (x - 0.5)` inside; `refcoco_mask2str` passes
  the resized mask / 255).
- Codes: argmin over ||x||^2 + ||e||^2 - 2 x.e per position of the 4x4 grid, row-major.
- `mask_to_suffix` = `refcoco_mask2str`: crop at round(h * y1):round(h * y2),
  round(w * x1):round(w * x2); `tf.image.resize` to 64x64, bilinear, antialias; / 255;
  then loc tokens of clip(round(box * 1023), 0, 1023) and the 16 seg tokens, no spaces.
- `parse_segmentation` = the evaluator's decoding: loc / 1023, pixel box by truncation
  (`int(y1 * h)` ...), the 64x64 logit resized to the box with PIL bilinear, `> 0`.

Convolutions and the codebook distances run at `Precision.HIGHEST`, so accelerators that
would otherwise use bfloat16 passes give the same codes as big_vision's float32 TF.

For data sources: `mask_codes` + `codes_to_suffix` are `mask_to_suffix` in two steps,
`SuffixEncoder` writes whole `segment a ; b` targets with a VAE loaded on first use,
and `read_mask` reads ground-truth masks given as arrays, image files or COCO RLE.
`load_vae("shapes")` gives the demo's small VAE (paligemma/assets/make_shapes_vae.py).
Objects are parsed by `tokenizer.parse_objects`, shared with detection.
"""

import dataclasses
import threading

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from paligemma import tokenizer as tokenizer_lib

MASK_SIZE = 64  # The VAE's mask resolution.
GRID = 4  # Codes per side: 16 codes per mask.
NUM_CODES = GRID * GRID

_HIGHEST = jax.lax.Precision.HIGHEST
# (layer, in channels, out channels) of the strided layers; D (codebook dim) is read
# from the file.
_ENCODER_DOWN = (("encoder.0", 1, 16), ("encoder.2", 16, 32), ("encoder.4", 32, 64),
                 ("encoder.6", 64, 128))
_DECODER_UP = (("decoder.4", 128, 128), ("decoder.6", 128, 64), ("decoder.8", 64, 32),
               ("decoder.10", 32, 16))
_ENCODER_RES = ("encoder.8.net", "encoder.9.net")
_DECODER_RES = ("decoder.2.net", "decoder.3.net")
_CODEBOOK = "_vq_vae._embedding"
_RES_CHANNELS = 128



@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VAE:
  """The mask VQ-VAE's weights, kernels HWIO (transposed convs as their equivalent
  lhs-dilated forward conv). Each conv is a (kernel, bias) pair; each ResBlock a tuple of
  three convs (3x3, 3x3, 1x1)."""
  encoder_down: tuple
  encoder_res: tuple
  encoder_out: tuple
  codebook: jax.Array  # float32[K, D]
  decoder_in: tuple
  decoder_res: tuple
  decoder_up: tuple
  decoder_out: tuple

  @property
  def codebook_size(self):
    return self.codebook.shape[0]

  @property
  def dim(self):
    return self.codebook.shape[1]


# ---------------------------------------------------------------------------------------
# Loading.


def _expected_shapes(codebook_size, dim):
  """{key: shape} of the released state dict for a codebook float32[K, D]."""
  shapes = {_CODEBOOK: (codebook_size, dim)}

  def conv(name, cin, cout, k):
    shapes[name + ".weight"] = (cout, cin, k, k)
    shapes[name + ".bias"] = (cout,)

  def resblock(name):
    conv(name + ".0", _RES_CHANNELS, _RES_CHANNELS, 3)
    conv(name + ".2", _RES_CHANNELS, _RES_CHANNELS, 3)
    conv(name + ".4", _RES_CHANNELS, _RES_CHANNELS, 1)

  for name, cin, cout in _ENCODER_DOWN:
    conv(name, cin, cout, 4)
  for name in _ENCODER_RES + _DECODER_RES:
    resblock(name)
  conv("encoder.10", _RES_CHANNELS, dim, 1)
  conv("decoder.0", dim, _RES_CHANNELS, 1)
  for name, cin, cout in _DECODER_UP:
    shapes[name + ".weight"] = (cin, cout, 4, 4)  # ConvTranspose2d: (in, out, kh, kw).
    shapes[name + ".bias"] = (cout,)
  conv("decoder.12", 16, 1, 1)
  return shapes


def _check_state_dict(state, source):
  """Raises ValueError naming the first missing key or wrong shape of `state`."""
  if _CODEBOOK not in state:
    raise ValueError(f"{source}: missing key {_CODEBOOK!r} (the codebook float32[K, D]); "
                     "is this big_vision's vae-oid.npz?")
  codebook = np.asarray(state[_CODEBOOK])
  if codebook.ndim != 2:
    raise ValueError(f"{source}: {_CODEBOOK!r} has shape {codebook.shape}, expected "
                     "[K, D] (codebook size, dim).")
  if codebook.shape[0] > tokenizer_lib.NUM_SEG:
    raise ValueError(f"{source}: codebook has {codebook.shape[0]} rows but there are only "
                     f"{tokenizer_lib.NUM_SEG} <segNNN> tokens.")
  expected = _expected_shapes(*codebook.shape)
  missing = sorted(set(expected) - set(state))
  if missing:
    raise ValueError(f"{source}: missing key(s) {missing[:5]}{'...' if len(missing) > 5 else ''}"
                     f" ({len(missing)} of {len(expected)}); expected the PyTorch state dict of "
                     "big_vision's mask VAE (vae-oid.npz).")
  for key, shape in expected.items():
    got = tuple(np.shape(state[key]))
    if got != shape:
      raise ValueError(f"{source}: {key!r} has shape {got}, expected {shape} "
                       f"(codebook {codebook.shape}); the file does not match the AiT VAE layout.")


def _conv(state, name):
  """(float32[kh, kw, in, out], float32[out]) from a PyTorch Conv2d (OIHW)."""
  kernel = np.transpose(np.asarray(state[name + ".weight"], np.float32), (2, 3, 1, 0))
  return jnp.asarray(kernel), jnp.asarray(state[name + ".bias"], jnp.float32)


def _conv_transpose(state, name):
  """The forward-conv (HWIO kernel, bias) equal to a PyTorch ConvTranspose2d.

  A transposed conv is a conv of the stride-dilated input with the kernel flipped in
  space and its in/out axes swapped: (in, out, kh, kw) -> [::-1, ::-1] (kh, kw, in, out).
  """
  weight = np.asarray(state[name + ".weight"], np.float32)
  kernel = np.transpose(weight, (2, 3, 0, 1))[::-1, ::-1]
  return jnp.asarray(np.ascontiguousarray(kernel)), jnp.asarray(state[name + ".bias"], jnp.float32)


def _resblock(state, name):
  return tuple(_conv(state, f"{name}.{i}") for i in (0, 2, 4))


def vae_from_state_dict(state, source="state dict"):
  """VAE from a {PyTorch key: array} dict in the released layout (checked first)."""
  _check_state_dict(state, source)
  return VAE(
      encoder_down=tuple(_conv(state, name) for name, _, _ in _ENCODER_DOWN),
      encoder_res=tuple(_resblock(state, name) for name in _ENCODER_RES),
      encoder_out=_conv(state, "encoder.10"),
      codebook=jnp.asarray(state[_CODEBOOK], jnp.float32),
      decoder_in=_conv(state, "decoder.0"),
      decoder_res=tuple(_resblock(state, name) for name in _DECODER_RES),
      decoder_up=tuple(_conv_transpose(state, name) for name, _, _ in _DECODER_UP),
      decoder_out=_conv(state, "decoder.12"),
  )


SHAPES_VAE = "shapes"  # `load_vae` name of the demo's VAE (paligemma.assets.make_shapes_vae).


def load_vae(path):
  """VAE from big_vision's `vae-oid.npz` (or any .npz in its layout); "shapes" gives the
  demo's small VAE, trained on first use."""
  if path == SHAPES_VAE:
    from paligemma.assets import make_shapes_vae  # pylint: disable=g-import-not-at-top
    path = make_shapes_vae.path()
  try:
    with np.load(path) as npz:
      state = {key: npz[key] for key in npz.files}
  except FileNotFoundError as e:
    raise FileNotFoundError(
        f"No VAE file at {path!r}; download it from "
        "https://storage.googleapis.com/big_vision/paligemma/vae-oid.npz") from e
  return vae_from_state_dict(state, source=str(path))


def random_state_dict(seed=0, codebook_size=128, dim=32):
  """{key: float32 array} in the released layout with random weights, for tests and demos.

  Weights are He-uniform and biases uniform(+-1/sqrt(fan_in)), fan_in counted as PyTorch
  does (weight.shape[1:]): ReLU activations stay O(1) through the dozen layers, where
  PyTorch's default init shrinks the decoder's output to a near constant. Codebook rows
  are encoder outputs of random blob masks, so different masks get different codes.
  """
  rng = np.random.default_rng(seed)
  state = {}
  for key, shape in _expected_shapes(codebook_size, dim).items():
    if key.endswith(".weight"):
      fan_in = np.prod(shape[1:])
      state[key] = rng.uniform(-1, 1, shape).astype(np.float32) * np.sqrt(6.0 / fan_in)
  for key, shape in _expected_shapes(codebook_size, dim).items():
    if key.endswith(".bias"):
      fan_in = np.prod(state[key[:-len("bias")] + "weight"].shape[1:])
      state[key] = rng.uniform(-1, 1, shape).astype(np.float32) / np.sqrt(fan_in)
  state[_CODEBOOK] = np.zeros((codebook_size, dim), np.float32)  # Placeholder to encode.
  blobs = random_blobs(rng, -(-codebook_size // NUM_CODES))
  features = np.asarray(_encode_features(vae_from_state_dict(state), blobs)).reshape(-1, dim)
  state[_CODEBOOK] = features[rng.permutation(len(features))[:codebook_size]]
  return state


def random_blobs(rng, n, size=MASK_SIZE):
  """float32[n, size, size] 0/1 masks of smooth random blobs (upsampled 8x8 noise > 0)."""
  noise = rng.standard_normal((n, 8, 8)).astype(np.float32)
  up = np.asarray(jax.image.resize(noise, (n, size, size), "bilinear"))
  return (up > 0).astype(np.float32)


def random_vae(seed=0, codebook_size=128, dim=32):
  """VAE with random weights (`random_state_dict`)."""
  return vae_from_state_dict(random_state_dict(seed, codebook_size, dim), source="random_vae")


# ---------------------------------------------------------------------------------------
# Encoder and decoder (NHWC).


def _apply_conv(x, conv, *, stride=1, padding="SAME", lhs_dilation=None):
  kernel, bias = conv
  y = jax.lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride), padding=padding,
      lhs_dilation=lhs_dilation, dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=_HIGHEST)
  return y + bias


def _apply_resblock(x, block):
  """conv3x3 -> ReLU -> conv3x3 -> ReLU -> conv1x1, plus the input (no ReLU after)."""
  y = jax.nn.relu(_apply_conv(x, block[0]))
  y = jax.nn.relu(_apply_conv(y, block[1]))
  return x + _apply_conv(y, block[2])


@jax.jit
def _encode_features(vae, masks):
  """float32[B, 4, 4, D] encoder outputs (before quantization) of masks in [0, 1]."""
  x = 2.0 * (masks[..., None] - 0.5)  # big_vision's _norm, inside the encoder.
  for conv in vae.encoder_down:
    # TF 'SAME' with k=4, s=2 on even sizes pads 1 each side, as PyTorch padding=1.
    x = jax.nn.relu(_apply_conv(x, conv, stride=2))
  for block in vae.encoder_res:
    x = _apply_resblock(x, block)
  return _apply_conv(x, vae.encoder_out)


@jax.jit
def _encode(vae, masks):
  x = _encode_features(vae, masks)
  flat = x.reshape(x.shape[0], NUM_CODES, -1)  # Row-major over the 4x4 grid.
  e = vae.codebook
  distances = (jnp.sum(flat**2, -1, keepdims=True) + jnp.sum(e**2, -1)
               - 2 * jnp.einsum("bnd,kd->bnk", flat, e, precision=_HIGHEST))
  return jnp.argmin(distances, -1).astype(jnp.int32)


@jax.jit
def _decode(vae, codes):
  x = jnp.take(vae.codebook, codes, axis=0)  # [B, 16, D]
  x = x.reshape(codes.shape[0], GRID, GRID, -1)  # Code k at row k // 4, column k % 4.
  x = jax.nn.relu(_apply_conv(x, vae.decoder_in))
  for block in vae.decoder_res:
    x = _apply_resblock(x, block)
  for conv in vae.decoder_up:
    # PyTorch ConvTranspose2d(k=4, s=2, padding=1) = dilate by 2, pad k - 1 - 1 = 2.
    x = jax.nn.relu(_apply_conv(x, conv, padding=((2, 2), (2, 2)), lhs_dilation=(2, 2)))
  return _apply_conv(x, vae.decoder_out)[..., 0]


def encode_masks(vae, masks):
  """int32[B, 16] codes of masks float32[B, 64, 64] in [0, 1] (mapped to [-1, 1] here)."""
  masks = jnp.asarray(masks, jnp.float32)
  if masks.ndim != 3 or masks.shape[1:] != (MASK_SIZE, MASK_SIZE):
    raise ValueError(f"encode_masks takes float32[B, 64, 64] masks, got shape {masks.shape}; "
                     "crop and resize them first (see mask_to_suffix).")
  return _encode(vae, masks)


def decode_codes(vae, codes):
  """float32[B, 64, 64] mask logits (> 0 inside) of codes int32[B, 16] in [0, K)."""
  codes = np.asarray(codes)
  if codes.ndim != 2 or codes.shape[1] != NUM_CODES:
    raise ValueError(f"decode_codes takes int32[B, 16] codes, got shape {codes.shape}.")
  if codes.size and (codes.min() < 0 or codes.max() >= vae.codebook_size):
    # jnp.take would clamp silently and decode a different mask.
    raise ValueError(f"Codes must lie in [0, {vae.codebook_size}), got "
                     f"[{codes.min()}, {codes.max()}].")
  return _decode(vae, jnp.asarray(codes, jnp.int32))


# ---------------------------------------------------------------------------------------
# Strings.


def _mask_as_255(mask):
  """float32[H, W] in [0, 255] of a bool, uint8 (0/255) or float ([0, 1]) mask.

  big_vision's masks are uint8 0/255 and it divides the resized crop by 255; bool and
  float [0, 1] masks are scaled by 255 so they give the same codes. A uint8 mask whose
  maximum is 1 is taken for a 0/1 mask by mistake and refused.
  """
  mask = np.asarray(mask)
  if mask.ndim == 3:
    mask = mask[..., 0]  # big_vision reads channel 0 of [H, W, 3] masks.
  if mask.ndim != 2:
    raise ValueError(f"A mask is [H, W] (or [H, W, C]), got shape {mask.shape}.")
  if mask.dtype == np.bool_:
    return mask.astype(np.float32) * 255.0
  if mask.dtype == np.uint8:
    if mask.max() == 1:
      raise ValueError("uint8 mask with values 0/1: big_vision's uint8 masks are 0/255; "
                       "pass mask.astype(bool) or mask * 255.")
    return mask.astype(np.float32)
  if np.issubdtype(mask.dtype, np.floating):
    if mask.size and (mask.min() < 0 or mask.max() > 1):
      raise ValueError(f"Float masks must lie in [0, 1], got [{mask.min()}, {mask.max()}].")
    return mask.astype(np.float32) * 255.0
  raise ValueError(f"Masks are bool, uint8 (0/255) or float in [0, 1], got {mask.dtype}.")


def read_mask(mask, shape=None):
  """bool[H, W] of a mask given as an array (> 0 inside), an image path (channel 0 > 0)
  or COCO RLE {"size": [H, W], "counts"}; `shape` (H, W), if given, is checked."""
  if isinstance(mask, dict):
    from pycocotools import mask as mask_utils  # pylint: disable=g-import-not-at-top
    rle = dict(mask)
    if isinstance(rle.get("counts"), list):  # Uncompressed RLE, as COCO's iscrowd masks.
      rle = mask_utils.frPyObjects(rle, *rle["size"])
    out = mask_utils.decode(rle).astype(bool)
  elif isinstance(mask, str):
    with Image.open(mask) as im:
      out = np.asarray(im)
    out = (out[..., 0] if out.ndim == 3 else out) > 0
  else:
    out = np.asarray(mask)
    out = (out[..., 0] if out.ndim == 3 else out) > 0
  if shape is not None and out.shape != tuple(shape):
    raise ValueError(f"Mask of shape {out.shape} for an image of {tuple(shape)}: a ground-truth "
                     "mask must have the image's own size.")
  return out


def crop_and_resize(mask, box):
  """float32[64, 64] in [0, 1]: `mask` cropped to `box` (y1, x1, y2, x2) in [0, 1] as
  big_vision rounds it, resized with tf.image.resize (bilinear, antialias)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  # Only for encoding.
  mask = _mask_as_255(mask)
  h, w = mask.shape
  box = np.asarray(box, np.float32)  # big_vision rounds in float32 (tf.round(h * bbox)).
  if box.shape != (4,):
    raise ValueError(f"A box is (y_min, x_min, y_max, x_max) in [0, 1], got shape {box.shape}.")
  y1, x1, y2, x2 = (int(np.round(s * b)) for s, b in zip(np.float32([h, w, h, w]), box))
  crop = mask[y1:y2, x1:x2]
  if crop.size == 0:
    raise ValueError(f"Box {box.tolist()} covers no pixel of the {h}x{w} mask "
                     f"(rows {y1}:{y2}, columns {x1}:{x2}); give a box with y2 > y1, x2 > x1.")
  resized = tf.image.resize(crop[None, :, :, None], [MASK_SIZE, MASK_SIZE],
                            method="bilinear", antialias=True)
  return resized.numpy()[0, :, :, 0] / 255.0


def mask_codes(vae, mask, box):
  """int32[16] codes of a full-image mask [H, W] inside `box` (y1, x1, y2, x2) in [0, 1]."""
  return np.asarray(encode_masks(vae, crop_and_resize(mask, box)[None]))[0]


def codes_to_suffix(codes, box):
  """`<loc>`x4 of `box` (y1, x1, y2, x2) in [0, 1] + `<seg>`x16 of `codes`, no spaces."""
  # big_vision bins the float32 box in float32 (tf.round, half to even like np.round);
  # box_to_loc works in float64, which can differ by one bin on a .5 boundary.
  bins = np.clip(np.round(np.float32(box) * np.float32(tokenizer_lib.LOC_FACTOR)),
                 0, tokenizer_lib.LOC_FACTOR).astype(int)
  return ("".join(tokenizer_lib.loc_piece(b) for b in bins)
          + "".join(tokenizer_lib.seg_piece(c) for c in codes))


def mask_to_suffix(vae, mask, box):
  """`<loc>`x4 + `<seg>`x16 (no spaces) of a full-image mask [H, W] inside `box`
  (y1, x1, y2, x2) in [0, 1], as big_vision's refcoco_mask2str."""
  return codes_to_suffix(mask_codes(vae, mask, box), box)


class SuffixEncoder:
  """Segmentation targets for a data source: the VAE at `vae_path` loaded on first use
  (sources are built before training starts; a process that never reads an example
  never loads it), thread-safe. `cache=True` keeps the codes of each distinct crop, for
  data whose crops repeat (the synthetic shapes)."""

  def __init__(self, vae_path, cache=False):
    if not vae_path:
      raise ValueError("A segmentation source needs `vae`: the path of big_vision's "
                       "vae-oid.npz (or \"shapes\" for the demo's VAE).")
    self.vae_path, self._vae, self._cache = vae_path, None, {} if cache else None
    self._lock = threading.Lock()

  @property
  def vae(self):
    with self._lock:
      if self._vae is None:
        self._vae = load_vae(self.vae_path)
    return self._vae

  def codes(self, mask, box):
    """int32[16] codes of a full-image mask inside `box` (see `mask_codes`)."""
    if self._cache is None:
      return mask_codes(self.vae, mask, box)
    mask = np.asarray(mask)
    h, w = mask.shape[:2]
    y1, x1, y2, x2 = (int(np.round(v * s)) for v, s in zip(box, (h, w, h, w)))
    key = (mask[y1:y2, x1:x2].tobytes(), mask.dtype.str, y2 - y1, x2 - x1)
    if key not in self._cache:
      self._cache[key] = mask_codes(self.vae, mask, box)
    return self._cache[key]

  def __call__(self, masks, boxes, labels):
    """`<loc>x4<seg>x16 label ; ...` of full-image masks with their boxes and labels."""
    if not len(masks) == len(boxes) == len(labels):
      raise ValueError(f"{len(masks)} masks, {len(boxes)} boxes and {len(labels)} labels.")
    return " ; ".join(f"{codes_to_suffix(self.codes(m, b), b)} {l}".rstrip()
                      for m, b, l in zip(masks, boxes, labels))


def parse_segmentation(text, vae, height, width):
  """([dict(label, box=float64[4] in [0, 1], mask=bool[H, W])], number invalid) of a
  segmentation string: objects joined by " ; ", each 4 `<loc>` + 16 `<seg>` + a label
  (may be empty, as RefCOCO outputs are).

  As big_vision's evaluator: box = loc / 1023; pixel box by truncation; the decoded
  64x64 logit resized to the pixel box (PIL bilinear) and thresholded > 0. Malformed
  objects, inverted boxes, codes beyond the codebook and boxes that vanish in pixels
  are counted in `invalid` and left out, never raised.
  """
  parsed, invalid = tokenizer_lib.parse_objects(text, segments=True)
  beyond = [obj for obj in parsed if max(obj[2]) >= vae.codebook_size]
  parsed = [obj for obj in parsed if max(obj[2]) < vae.codebook_size]
  invalid += len(beyond)
  if not parsed:
    return [], invalid
  logits = np.asarray(decode_codes(vae, np.array([codes for _, _, codes in parsed], np.int32)))
  objects = []
  for (label, bins, _), logit in zip(parsed, logits):
    box = np.array(bins, np.float64) / tokenizer_lib.LOC_FACTOR
    y1, x1, y2, x2 = map(int, box * [height, width, height, width])
    if y2 <= y1 or x2 <= x1:  # Can still happen after int(), as big_vision notes.
      invalid += 1
      continue
    inside = np.asarray(Image.fromarray(logit).resize((x2 - x1, y2 - y1), Image.BILINEAR)) > 0
    mask = np.zeros((height, width), bool)
    mask[y1:y2, x1:x2] = inside
    objects.append(dict(label=label, box=box, mask=mask))
  return objects, invalid
