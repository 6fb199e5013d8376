"""Fitting checkpoint leaves to a new config: position embeddings at another resolution."""

import ml_dtypes
import numpy as np
import pytest
import scipy.ndimage

from paligemma.checkpoint import adapt


def _posemb(grid, width=6, seed=0, dtype=np.float32):
  """float[1, grid * grid, width] random embeddings, std 1 like a trained table's scale."""
  rng = np.random.default_rng(seed)
  return rng.standard_normal((1, grid * grid, width)).astype(dtype)


def _scipy_zoom(posemb, new_grid):
  """big_vision's resample_posemb: scipy.ndimage.zoom of the [gs, gs, W] grid, order 1."""
  old_grid = int(np.sqrt(posemb.shape[1]))
  grid = posemb.reshape(old_grid, old_grid, -1)
  ratio = new_grid / old_grid
  return scipy.ndimage.zoom(grid, (ratio, ratio, 1), order=1).reshape(1, new_grid ** 2, -1)


@pytest.mark.parametrize("old_grid,new_grid", [(4, 8), (8, 4), (16, 32), (32, 16), (6, 9)])
def test_resize_posemb_is_scipy_zoom(old_grid, new_grid):
  posemb = _posemb(old_grid, seed=old_grid * 100 + new_grid)
  out = adapt.resize_posemb(posemb, new_grid ** 2)
  expected = _scipy_zoom(posemb, new_grid)
  assert out.shape == (1, new_grid ** 2, posemb.shape[2]) and out.dtype == np.float32
  np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("old_grid,new_grid", [(4, 8), (8, 4)])
def test_corners_stay_put(old_grid, new_grid):
  """scipy's grid_mode=False maps corner to corner, shrinking as well as growing."""
  posemb = _posemb(old_grid)
  grid = adapt.resize_posemb(posemb, new_grid ** 2).reshape(new_grid, new_grid, -1)
  old = posemb.reshape(old_grid, old_grid, -1)
  a, b = old_grid - 1, new_grid - 1
  for (i, j), (k, l) in {(0, 0): (0, 0), (0, a): (0, b), (a, 0): (b, 0), (a, a): (b, b)}.items():
    np.testing.assert_allclose(grid[k, l], old[i, j], rtol=0, atol=1e-6)


def test_bfloat16_goes_through_float32():
  posemb = _posemb(4, dtype=ml_dtypes.bfloat16)
  out = adapt.resize_posemb(posemb, 64)
  assert out.dtype == posemb.dtype
  expected = _scipy_zoom(posemb.astype(np.float32), 8).astype(ml_dtypes.bfloat16)
  assert np.array_equal(out.astype(np.float32), expected.astype(np.float32))


def test_same_size_and_non_square():
  posemb = _posemb(4)
  assert adapt.resize_posemb(posemb, 16) is posemb
  with pytest.raises(ValueError, match="not square"):
    adapt.resize_posemb(posemb, 15)
