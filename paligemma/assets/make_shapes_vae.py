"""Trains `shapes_vae.npz`, a small mask VQ-VAE in the layout of big_vision's vae-oid.npz,
for the shapes segmentation demo and the tests.

  python -m paligemma.assets.make_shapes_vae [--output PATH] [--steps 600]

Same keys and layers as the released file (PyTorch state-dict names, OIHW convs), with a
smaller codebook (`CODEBOOK_SIZE` rows of dim `DIM`), so `segmentation.load_vae` reads
it like the real one. Trained on the 64x64 crops of circles, squares and triangles drawn
at sides 6 to 120 pixels (the crop `mask_to_suffix` makes of a shape is its square box;
other masks decode badly with it): a VQ-VAE (straight-through
codes, codebook and commitment losses as in van den Oord et al.) whose decoder regresses
the mask mapped to [-1, 1], so its output is a logit about [-1, 1] with 0 the edge, as
the released decoder's. The narrow net trains in about 2 minutes on 2 CPU cores and
its 64x64 masks keep a mean IoU of 0.99 through encode and decode. The file (180 KB,
mostly zero padding, compressed) is committed; `path()` rebuilds it on first use if it
is missing (next to this script, else in ~/.cache/paligemma); `load_vae("shapes")`
and the shapes source's default `vae` go through it.
"""

# The VAE's layer helpers and key tables are private to `segmentation`; training here
# reuses them so the trained net is the one `load_vae` runs.
# pylint: disable=protected-access

import argparse
import dataclasses
import functools
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image, ImageDraw

from paligemma import segmentation as seg
from paligemma.data import shapes

CODEBOOK_SIZE, DIM = 128, 16
STEPS, BATCH, SEED, LR = 800, 32, 0, 3e-3
# Trained widths of the layers the released layout has 16, 32, 64, 128 (strided) and
# 128 (ResBlocks) channels: the narrow net is padded with zero weights into that layout
# afterwards, which leaves its outputs unchanged (zero channels stay zero through ReLU
# and the residual adds) and trains ~50x faster on a CPU.
_DOWN = (8, 8, 16, 16)
_RES = 16
_UP = (16, 16, 8, 8)
FILENAME = "shapes_vae.npz"
_BETA = 0.25  # Commitment weight (van den Oord et al.).


def shape_masks(rng, n, sides=(6, 120)):
  """float32[n, 64, 64] crops of random shapes (kind and side in pixels drawn from rng),
  made as `mask_to_suffix` makes them (crop to the box, antialiased resize)."""
  out = []
  for _ in range(n):
    kind = shapes.SHAPES[rng.integers(len(shapes.SHAPES))]
    side = int(rng.integers(sides[0], sides[1] + 1))
    img = Image.new("L", (side, side), 0)
    shapes.draw_shape(ImageDraw.Draw(img), kind, 0, 0, side, 255)
    out.append(seg.crop_and_resize(np.asarray(img) > 0, (0.0, 0.0, 1.0, 1.0)))
  return np.stack(out).astype(np.float32)


def training_masks(seed=SEED, num=1000):
  return shape_masks(np.random.default_rng(seed), num)


def _loss(vae, masks):
  z = seg._encode_features(vae, masks).reshape(masks.shape[0], seg.NUM_CODES, -1)
  e = vae.codebook
  d = jnp.sum(z**2, -1, keepdims=True) + jnp.sum(e**2, -1) - 2 * jnp.einsum("bnd,kd->bnk", z, e)
  q = jnp.take(e, jnp.argmin(d, -1), axis=0)
  vq = jnp.mean((jax.lax.stop_gradient(z) - q)**2) + _BETA * jnp.mean(
      (z - jax.lax.stop_gradient(q))**2)
  q = z + jax.lax.stop_gradient(q - z)  # Straight-through.
  logits = _decode_vectors(vae, q)
  recon = jnp.mean((logits - (2 * masks - 1))**2)
  return recon + vq, recon


def _decode_vectors(vae, x):
  """The decoder of `segmentation` on vectors float32[B, 16, D] rather than codes."""
  x = x.reshape(x.shape[0], seg.GRID, seg.GRID, -1)
  x = jax.nn.relu(seg._apply_conv(x, vae.decoder_in))
  for block in vae.decoder_res:
    x = seg._apply_resblock(x, block)
  for conv in vae.decoder_up:
    x = jax.nn.relu(seg._apply_conv(x, conv, padding=((2, 2), (2, 2)), lhs_dilation=(2, 2)))
  return seg._apply_conv(x, vae.decoder_out)[..., 0]


def _narrow_vae(rng):
  """A VAE of the released topology with the narrow widths, He-uniform initialised."""

  def conv(k, cin, cout):
    bound = np.sqrt(6.0 / (k * k * cin))
    return (jnp.asarray(rng.uniform(-bound, bound, (k, k, cin, cout)), jnp.float32),
            jnp.zeros((cout,), jnp.float32))

  res = lambda: tuple(conv(k, _RES, _RES) for k in (3, 3, 1))
  down = tuple(conv(4, cin, cout) for cin, cout in zip((1,) + _DOWN[:-1], _DOWN))
  up = tuple(conv(4, cin, cout) for cin, cout in zip((_RES,) + _UP[:-1], _UP))
  return seg.VAE(encoder_down=down, encoder_res=(res(), res()), encoder_out=conv(1, _RES, DIM),
                 codebook=jnp.zeros((CODEBOOK_SIZE, DIM)), decoder_in=conv(1, DIM, _RES),
                 decoder_res=(res(), res()), decoder_up=up, decoder_out=conv(1, _UP[-1], 1))


def _pad(conv, cin, cout):
  """A (HWIO kernel, bias) zero-padded to `cin` inputs and `cout` outputs."""
  kernel, bias = (np.asarray(a) for a in conv)
  k = np.zeros(kernel.shape[:2] + (cin, cout), np.float32)
  k[:, :, :kernel.shape[2], :kernel.shape[3]] = kernel
  b = np.zeros((cout,), np.float32)
  b[:bias.shape[0]] = bias
  return k, b


def to_released_widths(vae):
  """The narrow VAE zero-padded into the released layer widths (same outputs)."""
  r = seg._RES_CHANNELS
  res = lambda blocks: tuple(tuple(_pad(c, r, r) for c in block) for block in blocks)
  return seg.VAE(
      encoder_down=tuple(_pad(c, cin, cout) for c, (_, cin, cout) in
                         zip(vae.encoder_down, seg._ENCODER_DOWN)),
      encoder_res=res(vae.encoder_res), encoder_out=_pad(vae.encoder_out, r, DIM),
      codebook=vae.codebook, decoder_in=_pad(vae.decoder_in, DIM, r),
      decoder_res=res(vae.decoder_res),
      decoder_up=tuple(_pad(c, cin, cout) for c, (_, cin, cout) in
                       zip(vae.decoder_up, seg._DECODER_UP)),
      decoder_out=_pad(vae.decoder_out, seg._DECODER_UP[-1][2], 1))


def to_state_dict(vae):
  """{PyTorch key: float32 array} of a VAE: the inverse of `vae_from_state_dict`."""
  state = {seg._CODEBOOK: np.asarray(vae.codebook)}

  def conv(name, c):
    state[name + ".weight"] = np.transpose(np.asarray(c[0]), (3, 2, 0, 1))
    state[name + ".bias"] = np.asarray(c[1])

  def conv_t(name, c):
    state[name + ".weight"] = np.ascontiguousarray(
        np.transpose(np.asarray(c[0])[::-1, ::-1], (2, 3, 0, 1)))
    state[name + ".bias"] = np.asarray(c[1])

  for (name, _, _), c in zip(seg._ENCODER_DOWN, vae.encoder_down):
    conv(name, c)
  for names, blocks in ((seg._ENCODER_RES, vae.encoder_res), (seg._DECODER_RES, vae.decoder_res)):
    for name, block in zip(names, blocks):
      for i, c in zip((0, 2, 4), block):
        conv(f"{name}.{i}", c)
  conv("encoder.10", vae.encoder_out)
  conv("decoder.0", vae.decoder_in)
  for (name, _, _), c in zip(seg._DECODER_UP, vae.decoder_up):
    conv_t(name, c)
  conv("decoder.12", vae.decoder_out)
  return {k: np.ascontiguousarray(v, np.float32) for k, v in state.items()}


def train(steps=STEPS, seed=SEED, log=print):
  """(state dict, final reconstruction loss) of a VQ-VAE trained on shape masks."""
  masks = training_masks(seed)
  rng = np.random.default_rng(seed + 1)
  vae = _narrow_vae(rng)
  # Codebook rows start as encoder outputs of the training masks: every row in use.
  feats = np.asarray(seg._encode_features(vae, masks[:256])).reshape(-1, DIM)
  vae = dataclasses.replace(vae, codebook=jnp.asarray(
      feats[rng.choice(len(feats), CODEBOOK_SIZE, replace=False)]))
  tx = optax.adam(optax.cosine_decay_schedule(LR, steps))
  opt = tx.init(vae)

  @jax.jit
  def step(vae, opt, batch):
    (_, recon), grads = jax.value_and_grad(_loss, has_aux=True)(vae, batch)
    updates, opt = tx.update(grads, opt, vae)
    return optax.apply_updates(vae, updates), opt, recon

  recon = None
  for i in range(steps):
    idx = rng.integers(0, len(masks), BATCH)
    vae, opt, recon = step(vae, opt, masks[idx])
    if log and (i % 100 == 0 or i == steps - 1):
      log(f"step {i}: reconstruction mse {float(recon):.4f}")
  return to_state_dict(to_released_widths(vae)), float(recon)


def write(output, steps=STEPS, seed=SEED, log=print):
  """Trains and writes the npz atomically (several processes may build it at once)."""
  state, _ = train(steps, seed, log)
  folder = os.path.dirname(os.path.abspath(output))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".npz", dir=folder)
  with os.fdopen(fd, "wb") as f:
    np.savez_compressed(f, **state)  # Mostly zero padding: about 1 MB.
  os.chmod(tmp, 0o644)
  os.replace(tmp, output)
  return output


@functools.lru_cache(None)
def path():
  """Path of the shapes VAE, trained and written on first use."""
  here = os.path.join(os.path.dirname(os.path.abspath(__file__)), FILENAME)
  cache = os.path.join(os.path.expanduser("~"), ".cache", "paligemma", FILENAME)
  for candidate in (here, cache):
    if os.path.exists(candidate):
      return candidate
  target = here if os.access(os.path.dirname(here), os.W_OK) else cache
  print(f"Building the shapes mask VAE at {target} (once, about 2 minutes).", flush=True)
  return write(target, log=None)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), FILENAME))
  parser.add_argument("--steps", type=int, default=STEPS)
  parser.add_argument("--seed", type=int, default=SEED)
  args = parser.parse_args(argv)
  start = time.time()
  write(args.output, args.steps, args.seed)
  print(f"Wrote {args.output} in {time.time() - start:.0f} s.")


if __name__ == "__main__":
  main()
