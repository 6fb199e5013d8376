"""Hugging Face directories: import, export, round trips, name spellings and errors."""

import json
import os

import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

import hf_tiny
from paligemma import checkpoint
from paligemma.checkpoint import tree
from conftest import random_params
from test_checkpoint_npz import assert_same


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """{version: (directory, torch model)} of tiny random transformers PaliGemmas."""
  out = {}
  for version in (1, 2):
    d = tmp_path_factory.mktemp(f"hf{version}")
    out[version] = (str(d), hf_tiny.make_tiny_hf(str(d), version, seed=version))
  return out


def _inputs(model, seed=0, text_len=6):
  cfg = model.config
  n = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
  g = torch.Generator().manual_seed(seed)
  text = torch.randint(4, 1000, (2, text_len), generator=g)
  ids = torch.cat([torch.full((2, n), cfg.image_token_index), text], 1)
  types = torch.cat([torch.zeros(2, n + 3, dtype=torch.long),
                     torch.ones(2, text_len - 3, dtype=torch.long)], 1)
  size = cfg.vision_config.image_size
  pixels = torch.rand((2, 3, size, size), generator=g) * 2 - 1
  return dict(input_ids=ids, pixel_values=pixels, token_type_ids=types,
              attention_mask=torch.ones_like(ids))


def _logits(model, inputs):
  with torch.no_grad():
    return model(**inputs).logits.numpy()


@pytest.mark.parametrize("version", [1, 2])
def test_hf_ours_hf_ours_bit_identical(hf_dirs, tmp_path, version):
  directory, _ = hf_dirs[version]
  params, config = checkpoint.load(directory)
  assert params["llm"]["embedder"]["input_embedding"].shape == (257_152, 64)
  assert config["llm"]["post_norms"] == (version == 2)
  if version == 2:
    assert config["llm"]["sliding_window"] == 8 and config["llm"]["final_logits_softcap"] == 30
  checkpoint.save_hf(params, config, tmp_path / "out")
  again, config2 = checkpoint.load(tmp_path / "out")
  assert config2 == config
  assert_same(params, again)


@pytest.mark.parametrize("version", [1, 2])
def test_transformers_loads_export(hf_dirs, tmp_path, version):
  directory, original = hf_dirs[version]
  params, config = checkpoint.load(directory)
  checkpoint.save_hf(params, config, tmp_path / "out")
  with open(tmp_path / "out" / "config.json") as f:
    written = json.load(f)
  assert written["image_token_index"] == 257_152
  assert written["text_config"]["vocab_size"] == 257_216
  with safetensors.safe_open(tmp_path / "out" / "model.safetensors", "np") as f:
    assert any(k.startswith("vision_tower.vision_model.") for k in f.keys())  # Hub layout.
  model, info = transformers.PaliGemmaForConditionalGeneration.from_pretrained(
      tmp_path / "out", output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  theirs, ours = original.state_dict(), model.state_dict()
  for k, v in theirs.items():
    if "embed_tokens" in k or k == "lm_head.weight":
      torch.testing.assert_close(ours[k][:257_152], v[:257_152], rtol=0, atol=0)
      assert not ours[k][257_152:].any()  # Padding rows written as zeros.
    else:
      torch.testing.assert_close(ours[k], v, rtol=0, atol=0, msg=k)
  inputs = _inputs(original)
  a, b = _logits(original, inputs), _logits(model.eval(), inputs)
  np.testing.assert_allclose(a[..., :257_152], b[..., :257_152], atol=1e-5)


def test_in_memory_names_and_lm_head(hf_dirs, tmp_path):
  # transformers >= 4.52 in-memory spelling: model.vision_tower..., model.language_model..., lm_head.
  directory, original = hf_dirs[2]
  out = tmp_path / "mem"
  out.mkdir()
  state = {k: v.numpy() for k, v in original.state_dict().items()}
  assert "lm_head.weight" in state and any(k.startswith("model.language_model.") for k in state)
  safetensors.numpy.save_file(state, out / "model.safetensors", metadata={"format": "pt"})
  os.link(os.path.join(directory, "config.json"), out / "config.json")
  assert_same(checkpoint.load(directory)[0], checkpoint.load(out)[0])


def test_sharded_export_and_load(hf_dirs, tmp_path):
  params, config = checkpoint.load(hf_dirs[1][0])
  checkpoint.save_hf(params, config, tmp_path / "sh", max_shard_bytes=20 << 20)
  files = sorted(os.listdir(tmp_path / "sh"))
  assert "model.safetensors.index.json" in files
  assert sum(f.endswith(".safetensors") for f in files) >= 2
  assert_same(params, checkpoint.load(tmp_path / "sh")[0])
  model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(tmp_path / "sh")
  torch.testing.assert_close(model.state_dict()["model.language_model.norm.weight"],
                             torch.from_numpy(np.array(params["llm"]["final_norm"]["scale"])))


def test_small_vocab_export(tmp_path):
  from test_checkpoint_npz import CONFIGS  # pylint: disable=g-import-not-at-top
  config = CONFIGS["gemma2"]
  params = random_params(config)
  checkpoint.save_hf(params, config, tmp_path / "v")
  with open(tmp_path / "v" / "config.json") as f:
    written = json.load(f)
  assert written["image_token_index"] == 300 and written["vocab_size"] == 320
  model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(tmp_path / "v")
  assert model.config.text_config.sliding_window == 4096
  assert_same(params, checkpoint.load(tmp_path / "v")[0])


def test_bfloat16_export_round_trip(hf_dirs, tmp_path):
  params, config = checkpoint.load(hf_dirs[2][0], dtype="bfloat16")
  checkpoint.save_hf(params, config, tmp_path / "bf")
  with safetensors.safe_open(tmp_path / "bf" / "model.safetensors", "pt") as f:
    assert f.get_tensor("language_model.model.norm.weight").dtype == torch.bfloat16
  assert_same(params, checkpoint.load(tmp_path / "bf")[0])


def _copy_without(directory, out, drop=(), change=None):
  with safetensors.safe_open(os.path.join(directory, "model.safetensors"), "np") as f:
    state = {k: f.get_tensor(k) for k in f.keys() if k not in drop}
  if change:
    state[change] = state[change][:-1]
  os.makedirs(out)
  safetensors.numpy.save_file(state, os.path.join(out, "model.safetensors"))
  os.link(os.path.join(directory, "config.json"), os.path.join(out, "config.json"))


def test_missing_tensors_are_listed(hf_dirs, tmp_path):
  drop = ("language_model.model.layers.1.mlp.up_proj.weight",
          "vision_tower.embeddings.patch_embedding.bias")
  _copy_without(hf_dirs[1][0], str(tmp_path / "m"), drop=drop)
  with pytest.raises(checkpoint.CheckpointError) as e:
    checkpoint.load(tmp_path / "m")
  msg = str(e.value)
  assert str(tmp_path / "m") in msg and "2 tensor(s)" in msg
  assert "language_model.model.layers.1.mlp.up_proj.weight" in msg
  assert "vision_tower.vision_model.embeddings.patch_embedding.bias" in msg


def test_wrong_shape_tensor(hf_dirs, tmp_path):
  _copy_without(hf_dirs[2][0], str(tmp_path / "w"),
                change="language_model.model.layers.2.self_attn.k_proj.weight")
  with pytest.raises(checkpoint.CheckpointError) as e:
    checkpoint.load(tmp_path / "w")
  msg = str(e.value)
  assert "model.safetensors" in msg and "layers.2.self_attn.k_proj.weight" in msg
  assert "(31, 64)" in msg and "(32, 64)" in msg


def test_truncated_safetensors(hf_dirs, tmp_path):
  directory = hf_dirs[1][0]
  out = tmp_path / "t"
  out.mkdir()
  data = open(os.path.join(directory, "model.safetensors"), "rb").read()
  (out / "model.safetensors").write_bytes(data[:len(data) - 1000])
  os.link(os.path.join(directory, "config.json"), out / "config.json")
  with pytest.raises(checkpoint.CheckpointError) as e:
    checkpoint.load(out)
  msg = str(e.value)
  assert str(out / "model.safetensors") in msg and "truncated" in msg and "tensor '" in msg


def test_other_variant_config(hf_dirs):
  with pytest.raises(checkpoint.CheckpointError) as e:
    checkpoint.load(hf_dirs[2][0], config={"llm": {"variant": "gemma_tiny"}})
  assert hf_dirs[2][0] in str(e.value) and "in the model config" in str(e.value)


def test_pytorch_bin_directory_refused(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "paligemma"}))
  (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
  with pytest.raises(checkpoint.CheckpointError, match="convert it to safetensors|Convert it"):
    checkpoint.load(tmp_path)


def test_processor_files(tmp_path):
  from paligemma import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  tok = tokenizer_lib.Tokenizer(tokenizer_lib.TINY_TOKENIZER)
  config = {"img": {"variant": "mu/16", "image_size": 32},
            "llm": {"variant": "gemma_tiny", "vocab_size": tok.vocab_size}}
  checkpoint.save_hf(random_params(config), config, tmp_path / "p", tokenizer=tok)
  processor = transformers.AutoProcessor.from_pretrained(tmp_path / "p")
  assert processor.tokenizer.convert_tokens_to_ids("<image>") == tok.vocab_size
  got = processor(text="<image>caption en", suffix="hello world",
                  images=np.zeros((32, 32, 3), np.uint8)).input_ids[0]
  want = tok.encode("caption en\nhello world", bos=True, eos=True)
  assert list(got) == [tok.vocab_size] * 4 + list(want)
  assert tree.flatten(checkpoint.load(tmp_path / "p")[0])
