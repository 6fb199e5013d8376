"""big_vision .npz checkpoints: round trips, dtypes, layouts, resizing and errors."""

import tracemalloc
import zipfile

import jax
import ml_dtypes
import numpy as np
import pytest

from paligemma import checkpoint
from paligemma.checkpoint import loader
from paligemma.checkpoint import tree
from conftest import random_params, tiny_model_config

CONFIGS = {
    "gemma1": tiny_model_config(1),
    "gemma2": tiny_model_config(2),
    # kv_heads == heads: the fused qkv_einsum layout.
    "mha": tiny_model_config(1, num_kv_heads=4),
}


def assert_same(a, b):
  fa, fb = tree.flatten(a), tree.flatten(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    x, y = np.asarray(fa[k]), np.asarray(fb[k])
    assert x.dtype == y.dtype, (k, x.dtype, y.dtype)
    assert x.shape == y.shape, (k, x.shape, y.shape)
    assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), k


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_npz_round_trip_bit_identical(tmp_path, name):
  params = random_params(CONFIGS[name])
  path = tmp_path / "ckpt.npz"
  checkpoint.save_npz(params, path)
  loaded, config = checkpoint.load(path)
  assert_same(params, loaded)
  # A preset's name only when every dim matches it.
  assert config["llm"]["variant"] == (None if name == "mha" else CONFIGS[name]["llm"]["variant"])
  assert config["img"]["variant"] == "mu/16" and config["img"]["image_size"] == 32
  assert config["llm"]["vocab_size"] == 300
  # Saving what was loaded gives the same file contents.
  checkpoint.save_npz(loaded, tmp_path / "again.npz")
  assert_same(checkpoint.load(tmp_path / "again.npz")[0], params)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_files(tmp_path, dtype):
  params = random_params(CONFIGS["gemma2"])
  path = tmp_path / f"ckpt.{'bf16' if dtype == 'bfloat16' else 'f16'}.npz"
  checkpoint.save_npz(params, path, dtype=dtype)
  with np.load(path, allow_pickle=False) as f:  # What big_vision sees.
    raw = f["llm/final_norm/scale"]
  assert raw.dtype == (np.dtype("V2") if dtype == "bfloat16" else np.float16)
  loaded, _ = checkpoint.load(path)
  want = jax.tree.map(lambda x: x.astype(dtype), params)
  assert_same(want, loaded)
  # And cast on load, per leaf.
  as_f32, _ = checkpoint.load(path, dtype="float32")
  assert_same(jax.tree.map(lambda x: x.astype(np.float32), want), as_f32)


def test_params_prefix_and_per_layer_names(tmp_path):
  params = random_params(CONFIGS["gemma1"])
  flat = tree.flatten(tree.unstack_layers(params))
  assert "llm/layers_1/mlp/linear" in flat
  assert "img/Transformer/encoderblock_0/LayerNorm_0/scale" in flat
  path = tmp_path / "bv.npz"
  np.savez(path, **{f"params/{k}": v for k, v in flat.items()})
  loaded, config = checkpoint.load(path)
  assert_same(params, loaded)
  assert config["llm"]["depth"] == 2
  unstacked, _ = checkpoint.load(path, stacked=False)
  assert_same(tree.unflatten(flat), unstacked)
  assert_same(params, checkpoint.stack_layers(unstacked))


def test_bf16_void_written_by_plain_numpy(tmp_path):
  # big_vision's own writer: np.savez of bfloat16 arrays -> 2-byte void on disk.
  params = random_params(CONFIGS["gemma1"], dtype=ml_dtypes.bfloat16)
  flat = {k: v.view(np.dtype("V2")) for k, v in tree.flatten(params).items()}
  np.savez(tmp_path / "x.bf16.npz", **flat)
  loaded, _ = checkpoint.load(tmp_path / "x.bf16.npz")
  assert_same(params, loaded)


def test_dtype_and_sharding_callable(tmp_path):
  params = random_params(CONFIGS["gemma1"])
  checkpoint.save_npz(params, tmp_path / "c.npz")
  seen = []
  device = jax.devices()[0]

  def sharding(path, shape):
    seen.append((path, shape))
    return jax.sharding.SingleDeviceSharding(device)

  loaded, _ = checkpoint.load(tmp_path / "c.npz", dtype="bfloat16", sharding=sharding)
  assert (("llm", "layers", "mlp", "linear"), (2, 128, 64)) in seen
  assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(loaded))
  assert isinstance(loaded["llm"]["final_norm"]["scale"], jax.Array)


def test_vocab_and_resolution_adaptation(tmp_path):
  params = random_params(CONFIGS["gemma1"])
  checkpoint.save_npz(params, tmp_path / "c.npz")
  emb = params["llm"]["embedder"]["input_embedding"]
  bigger = {"img": {"image_size": 64}, "llm": {"vocab_size": 320}}
  loaded, config = checkpoint.load(tmp_path / "c.npz", config=bigger)
  assert config["img"]["image_size"] == 64 and config["llm"]["vocab_size"] == 320
  new_emb = np.asarray(loaded["llm"]["embedder"]["input_embedding"])
  np.testing.assert_array_equal(new_emb[:300], emb)
  # New rows: close to the mean row, but not identical to each other.
  np.testing.assert_allclose(new_emb[300:].mean(0), emb.mean(0), atol=0.05)
  assert not np.allclose(new_emb[300], new_emb[301])
  pos = np.asarray(loaded["img"]["pos_embedding"])
  assert pos.shape == (1, 16, 32)
  smaller, _ = checkpoint.load(tmp_path / "c.npz", config={"llm": {"vocab_size": 290}})
  np.testing.assert_array_equal(smaller["llm"]["embedder"]["input_embedding"], emb[:290])
  # Constant position embedding stays constant when resampled.
  params["img"]["pos_embedding"][:] = 0.25
  checkpoint.save_npz(params, tmp_path / "d.npz")
  loaded, _ = checkpoint.load(tmp_path / "d.npz", config={"img": {"image_size": 64}})
  np.testing.assert_allclose(loaded["img"]["pos_embedding"], 0.25, atol=1e-6)


def test_hf_sized_vocabulary_is_trimmed(tmp_path):
  config = {"img": {"variant": "mu/16", "image_size": 32},
            "llm": {"variant": "gemma_tiny", "width": 8, "head_dim": 4, "mlp_dim": 8,
                    "vocab_size": 257_216}}
  params = random_params(config)
  checkpoint.save_npz(params, tmp_path / "c.npz")
  loaded, got = checkpoint.load(tmp_path / "c.npz")
  assert got["llm"]["vocab_size"] == 257_152
  assert loaded["llm"]["embedder"]["input_embedding"].shape == (257_152, 8)


def test_truncated_file_names_file_and_key(tmp_path):
  params = random_params(CONFIGS["gemma1"])
  path = tmp_path / "c.npz"
  checkpoint.save_npz(params, path)
  data = path.read_bytes()
  cut = tmp_path / "cut.npz"
  cut.write_bytes(data[:len(data) // 2])
  with pytest.raises(checkpoint.CheckpointError) as e:
    checkpoint.load(cut)
  msg = str(e.value)
  assert str(cut) in msg and "truncated" in msg and "ends inside key '" in msg


def test_missing_key_names_each(tmp_path):
  flat = tree.flatten(random_params(CONFIGS["gemma2"]))
  del flat["llm/layers/post_ffw_norm/scale"]
  del flat["img/head/bias"]
  np.savez(tmp_path / "m.npz", **flat)
  with pytest.raises(checkpoint.CheckpointError) as e:
    checkpoint.load(tmp_path / "m.npz", config=CONFIGS["gemma2"])
  msg = str(e.value)
  assert str(tmp_path / "m.npz") in msg
  assert "llm/layers/post_ffw_norm/scale" in msg and "img/head/bias" in msg


def test_wrong_shape_names_key_and_shapes(tmp_path):
  flat = tree.flatten(random_params(CONFIGS["gemma1"]))
  flat["llm/layers/mlp/linear"] = flat["llm/layers/mlp/linear"][:, :100]
  np.savez(tmp_path / "w.npz", **flat)
  with pytest.raises(checkpoint.CheckpointError) as e:
    checkpoint.load(tmp_path / "w.npz", config=CONFIGS["gemma1"])
  msg = str(e.value)
  assert "w.npz" in msg and "llm/layers/mlp/linear" in msg
  assert "(2, 100, 64)" in msg and "(2, 128, 64)" in msg


def test_file_of_another_variant(tmp_path):
  checkpoint.save_npz(random_params(CONFIGS["gemma2"]), tmp_path / "g2.npz")
  with pytest.raises(checkpoint.CheckpointError) as e:
    checkpoint.load(tmp_path / "g2.npz", config={"llm": {"variant": "gemma_tiny"}})
  msg = str(e.value)
  assert "g2.npz" in msg and "llm/layers/" in msg and "another variant" in msg
  with pytest.raises(checkpoint.CheckpointError) as e:
    checkpoint.load(tmp_path / "g2.npz", config={"img": {"variant": "Ti/16"}})
  assert "img/embedding/kernel" in str(e.value) and "(16, 16, 3, 192)" in str(e.value)


def test_never_unpickles(tmp_path):
  obj = tmp_path / "obj.npz"
  np.savez(obj, **{"img/head/bias": np.array([{"a": 1}], dtype=object)})
  with pytest.raises(checkpoint.CheckpointError, match="unpickle"):
    checkpoint.load(obj)
  for name in ("pytorch_model.bin", "model.pt"):
    (tmp_path / name).write_bytes(b"\x80\x04")
    with pytest.raises(checkpoint.CheckpointError, match="safetensors"):
      checkpoint.load(tmp_path / name)


def test_compressed_npz(tmp_path):
  params = random_params(CONFIGS["gemma1"])
  np.savez_compressed(tmp_path / "z.npz", **tree.flatten(params))
  assert_same(params, checkpoint.load(tmp_path / "z.npz")[0])
  with zipfile.ZipFile(tmp_path / "z.npz") as zf:
    assert zf.infolist()[0].compress_type == zipfile.ZIP_DEFLATED


@pytest.mark.parametrize("stacked", [True, False])
@pytest.mark.parametrize("compressed", [False, True])
def test_per_leaf_dtype_cast_in_pieces(tmp_path, monkeypatch, stacked, compressed):
  # Frozen leaves in float16, the rest as stored; read in pieces of a few rows.
  monkeypatch.setattr(loader, "PIECE_BYTES", 4096)
  params = random_params(CONFIGS["gemma1"])
  if compressed:  # Read whole (inflated), then cast once.
    np.savez_compressed(tmp_path / "c.npz", **tree.flatten(params))
  else:
    checkpoint.save_npz(params, tmp_path / "c.npz")
  want = lambda name: "float32" if name.startswith("llm/layers/attn/") else "float16"
  loaded, _ = checkpoint.load(tmp_path / "c.npz", dtype=want, stacked=stacked)
  expected = tree.flatten(params)
  for name, arr in tree.flatten(loaded).items():
    stacked_name, layer = name, None
    if not stacked:
      split = name.split("/")
      for i, p in enumerate(split):
        if p.startswith(("layers_", "encoderblock_")):
          layer = int(p.split("_")[-1])
          split[i] = p.rsplit("_", 1)[0]
      stacked_name = "/".join(split)
    ref = expected[stacked_name] if layer is None else expected[stacked_name][layer]
    assert arr.dtype == np.dtype(want(stacked_name)), name
    np.testing.assert_array_equal(np.asarray(arr), ref.astype(want(stacked_name)), err_msg=name)


def test_cast_never_holds_a_leaf_twice(tmp_path, monkeypatch):
  # One big stacked leaf (8 MB in float32) loaded as float16: Python-side allocations
  # (numpy reports its buffers to tracemalloc) stay near the float16 result, well under
  # the float32 leaf plus its cast copy that a read-then-cast would hold.
  monkeypatch.setattr(loader, "PIECE_BYTES", 256 << 10)
  cfg = {"img": {"variant": "mu/16", "image_size": 32},
         "llm": {"variant": "gemma_tiny", "depth": 16, "mlp_dim": 8192, "vocab_size": 300}}
  checkpoint.save_npz(random_params(cfg), tmp_path / "big.npz")
  shapes = checkpoint.param_shapes(cfg)
  f16 = sum(int(np.prod(s)) for s in shapes.values()) * 2
  biggest = max(int(np.prod(s)) for s in shapes.values()) * 4
  assert biggest > 0.4 * f16 * 2  # The test means something: one leaf dominates.
  tracemalloc.start()
  try:
    loaded, _ = checkpoint.load(tmp_path / "big.npz", dtype="float16")
    jax.block_until_ready(loaded)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < f16 + biggest / 4, (peak, f16, biggest)
