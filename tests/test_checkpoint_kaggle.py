"""kaggle: handles resolved through kagglehub's own cache layout, with no network."""

import os

import pytest

from paligemma import checkpoint
from paligemma.checkpoint import kaggle
from conftest import random_params
from test_checkpoint_npz import CONFIGS, assert_same

HANDLE = "google/paligemma-2/jax/tiny-224"


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
  """An empty kagglehub cache and a Kaggle API that refuses connections (localhost:7777)."""
  cache = tmp_path / "kagglehub"
  monkeypatch.setenv("KAGGLEHUB_CACHE", str(cache))
  monkeypatch.setenv("KAGGLE_API_ENVIRONMENT", "TEST")  # kagglesdk: http://localhost:7777
  for var in ("KAGGLE_KERNEL_RUN_TYPE", "COLAB_RELEASE_TAG", "KAGGLE_USERNAME", "KAGGLE_KEY"):
    monkeypatch.delenv(var, raising=False)
  return cache


def _put_in_cache(cache, version, files, complete=True):
  """Lays files out as kagglehub 1.0 does: <cache>/models/<o>/<m>/<fw>/<var>/<version>/."""
  base = cache / "models" / HANDLE
  (base / str(version)).mkdir(parents=True)
  for name, params in files.items():
    checkpoint.save_npz(params, base / str(version) / name)
  if complete:
    (base / f"{version}.complete").touch()


def test_versioned_handle_from_cache(offline_cache):
  params = random_params(CONFIGS["gemma2"])
  _put_in_cache(offline_cache, 3, {"tiny-224.bf16.npz": params})
  loaded, config = checkpoint.load(f"kaggle:{HANDLE}/3", dtype="float32")
  assert config["llm"]["variant"] == "gemma2_tiny"
  assert loaded["llm"]["final_norm"]["scale"].shape == (64,)


def test_unversioned_handle_uses_newest_complete_version(offline_cache):
  old, new = random_params(CONFIGS["gemma1"], seed=1), random_params(CONFIGS["gemma1"], seed=2)
  _put_in_cache(offline_cache, 1, {"a.npz": old})
  _put_in_cache(offline_cache, 2, {"a.npz": new})
  _put_in_cache(offline_cache, 3, {"a.npz": old}, complete=False)  # Interrupted download.
  loaded, _ = checkpoint.load(f"kaggle:{HANDLE}")
  assert_same(new, loaded)


def test_file_inside_a_bundle(offline_cache):
  a, b = random_params(CONFIGS["gemma1"], seed=1), random_params(CONFIGS["gemma1"], seed=2)
  _put_in_cache(offline_cache, 1, {"m.npz": a, "m.f16.npz": b})
  with pytest.raises(checkpoint.CheckpointError, match="several checkpoints"):
    checkpoint.load(f"kaggle:{HANDLE}/1")
  loaded, _ = checkpoint.load(f"kaggle:{HANDLE}/1/m.npz")
  assert_same(a, loaded)


def test_offline_without_cache_says_what_to_do(offline_cache):
  with pytest.raises(checkpoint.CheckpointError) as e:
    checkpoint.load(f"kaggle:{HANDLE}")
  msg = str(e.value)
  assert HANDLE in msg and str(offline_cache) in msg
  assert "kagglehub.model_download" in msg and "local path" in msg


def test_bad_handle():
  with pytest.raises(checkpoint.CheckpointError, match="kaggle:<owner>/<model>"):
    kaggle.parse("kaggle:google/paligemma")
  h, f = kaggle.parse("kaggle:google/paligemma-2/jax/x/2/sub/f.npz")
  assert (h.version, f) == (2, "sub/f.npz")
  assert os.path.basename(str(h)) == "2"
