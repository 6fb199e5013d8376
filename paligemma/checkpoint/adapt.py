"""Fitting a checkpoint's leaves to another config: vocabulary rows, image resolution."""

import math

import numpy as np
import scipy.ndimage

# New embedding rows: the mean of the existing rows (a neutral token the model already
# "knows" how to read) plus noise of NEW_ROW_NOISE x the rows' std, so new tokens differ.
NEW_ROW_NOISE = 1e-2
NEW_ROW_SEED = 0


def resize_vocab(emb, rows):
  """float[V, W] -> float[rows, W]: trims, or appends mean + small-noise rows (seed 0)."""
  if emb.shape[0] >= rows:
    return emb[:rows]
  existing = np.asarray(emb, np.float32)
  rng = np.random.default_rng(NEW_ROW_SEED)
  noise = rng.standard_normal((rows - emb.shape[0], emb.shape[1]), np.float32)
  new = existing.mean(0) + noise * (NEW_ROW_NOISE * existing.std())
  return np.concatenate([np.asarray(emb), new.astype(emb.dtype)])


def resize_posemb(posemb, tokens):
  """float[1, N, W] -> float[1, tokens, W]: big_vision's `resample_posemb`, bit for bit.

  The sqrt(N) x sqrt(N) grid is zoomed linearly (spline order 1) with scipy's default
  grid_mode=False, so the corner tokens keep their embeddings, as big_vision does when it
  loads a ViT at another resolution (models/vit.py). jax.image.resize (half-pixel
  centres, antialiased when shrinking) differs from it by O(1) on random embeddings.
  """
  _, n, width = posemb.shape
  old, new = math.isqrt(n), math.isqrt(tokens)
  if old * old != n or new * new != tokens:
    raise ValueError(f"position embedding grid is not square: {n} -> {tokens} tokens")
  if n == tokens:
    return posemb
  # big_vision zooms the stored float32 array; other dtypes (bfloat16) go through float32.
  work = np.float64 if posemb.dtype == np.float64 else np.float32
  grid = np.asarray(posemb, work).reshape(old, old, width)
  out = scipy.ndimage.zoom(grid, (new / old, new / old, 1), order=1)
  return out.astype(posemb.dtype).reshape(1, tokens, width)
