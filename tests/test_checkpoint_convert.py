"""`python -m paligemma.convert`: every direction, dtype casts, summary line, errors."""

import glob
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile

import ml_dtypes
import numpy as np
import pytest

from paligemma import checkpoint
from paligemma import convert
from paligemma import lora as lora_lib
from paligemma import tokenizer as tokenizer_lib
from conftest import random_params
from test_checkpoint_npz import CONFIGS, assert_same

# The tiny tokenizer's vocabulary: --to hf writes processor files, which need a tokenizer.
TINY_VOCAB = tokenizer_lib.load_tokenizer().vocab_size
TINY = {name: dict(c, llm=dict(c["llm"], vocab_size=TINY_VOCAB)) for name, c in CONFIGS.items()}


def _workdir(root, tokenizer=None):
  """A trainer workdir as train.py exports it, with random tiny params (no training)."""
  os.makedirs(root)
  params = random_params(TINY["gemma1"])
  checkpoint.save_npz(params, os.path.join(root, "params.npz"))
  with open(os.path.join(root, "model_config.json"), "w") as f:
    json.dump(TINY["gemma1"], f)
  with open(os.path.join(root, "config.json"), "w") as f:
    json.dump({"tokenizer": tokenizer, "model": dict(TINY["gemma1"], dtype="float32")}, f)
  return params


def test_npz_hf_npz(tmp_path, capsys):
  params = random_params(TINY["gemma2"])
  checkpoint.save_npz(params, tmp_path / "a.npz")
  beside = shutil.copy(tokenizer_lib.TINY_TOKENIZER, tmp_path / "paligemma_tokenizer.model")
  assert convert.main([str(tmp_path / "a.npz"), str(tmp_path / "hf")]) == 0
  line = capsys.readouterr().out.strip().splitlines()[-1]
  count = sum(int(np.prod(s)) for s in checkpoint.param_shapes(TINY["gemma2"]).values())
  assert f"{count:,} parameters" in line and "(hf)" in line
  assert "mu/16 + gemma2_tiny at 32px" in line and "bytes" in line
  assert line.endswith(f"processor from {beside}")  # The tokenizer beside the .npz.
  assert convert.main([str(tmp_path / "hf"), str(tmp_path / "b.npz")]) == 0
  loaded, _ = checkpoint.load(tmp_path / "b.npz")
  # The sliding window is not in an .npz; everything else survives.
  assert_same(params, loaded)


def test_dtype_and_explicit_format(tmp_path, capsys):
  params = random_params(TINY["gemma1"])
  checkpoint.save_npz(params, tmp_path / "a.npz")
  assert convert.main([str(tmp_path / "a.npz"), str(tmp_path / "a.bf16.npz"),
                       "--dtype", "bfloat16"]) == 0
  assert "bfloat16" in capsys.readouterr().out
  loaded, _ = checkpoint.load(tmp_path / "a.bf16.npz")
  assert loaded["llm"]["final_norm"]["scale"].dtype == ml_dtypes.bfloat16
  assert convert.main([str(tmp_path / "a.bf16.npz"), str(tmp_path / "out"), "--to", "hf",
                       "--dtype", "float16"]) == 0
  loaded, _ = checkpoint.load(tmp_path / "out")
  assert loaded["img"]["head"]["kernel"].dtype == np.float16
  # No tokenizer anywhere: the tiny one, the only one of exactly this vocabulary.
  assert f"processor from {tokenizer_lib.TINY_TOKENIZER}" in capsys.readouterr().out


def test_workdir_to_npz(tmp_path):
  params = _workdir(str(tmp_path / "run"))
  assert convert.main([str(tmp_path / "run"), str(tmp_path / "out.npz")]) == 0
  loaded, config = checkpoint.load(tmp_path / "out.npz")
  assert_same(params, loaded)
  assert config["llm"]["vocab_size"] == TINY_VOCAB


def test_workdir_to_hf_processor(tmp_path, capsys):
  import transformers  # pylint: disable=g-import-not-at-top
  own = shutil.copy(tokenizer_lib.TINY_TOKENIZER, tmp_path / "own.model")
  _workdir(str(tmp_path / "run"), tokenizer=str(own))
  old_umask = os.umask(0o022)
  try:
    assert convert.main([str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
  finally:
    os.umask(old_umask)
  assert capsys.readouterr().out.strip().endswith(f"processor from {own}")  # config.json's.
  processor = transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
  tok = tokenizer_lib.load_tokenizer(own)
  for text in ("caption en\n", "detect cat ; dog\n<loc0012><loc1023> cat", "a dog, running"):
    assert processor.tokenizer(text, add_special_tokens=False).input_ids == tok.encode(text)
  assert processor.tokenizer.convert_tokens_to_ids("<image>") == TINY_VOCAB
  files = sorted(os.listdir(tmp_path / "hf"))
  assert "model.safetensors" in files and "tokenizer_config.json" in files
  modes = {f: stat.S_IMODE(os.stat(tmp_path / "hf" / f).st_mode) for f in files}
  assert modes == {f: 0o644 for f in files}  # As the umask says; not a temp file's 0600.
  for path in glob.glob(str(tmp_path / "hf" / "*.json")):
    with open(path) as f:
      text = f.read()
    assert tempfile.gettempdir() not in text and "vocab_file" not in text, path


def test_hf_without_tokenizer_refused(tmp_path, capsys):
  checkpoint.save_npz(random_params(CONFIGS["gemma1"]), tmp_path / "a.npz")  # Vocab 300.
  assert convert.main([str(tmp_path / "a.npz"), str(tmp_path / "hf")]) == 1
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "No tokenizer found" in err and "--tokenizer" in err
  assert not os.path.exists(tmp_path / "hf")  # Refused before writing anything.
  # A workdir whose run used the tiny tokenizer, but whose model does not fit it.
  os.makedirs(tmp_path / "run")
  os.replace(tmp_path / "a.npz", tmp_path / "run" / "params.npz")
  (tmp_path / "run" / "model_config.json").write_text(json.dumps(CONFIGS["gemma1"]))
  (tmp_path / "run" / "config.json").write_text(json.dumps({"tokenizer": None}))
  assert convert.main([str(tmp_path / "run"), str(tmp_path / "hf")]) == 1
  assert "--tokenizer" in capsys.readouterr().err


def test_unfinished_workdir_named(tmp_path, capsys):
  checkpoint.save_npz(random_params(CONFIGS["gemma1"]), tmp_path / "params.npz")
  (tmp_path / "config.json").write_text(json.dumps({"tokenizer": None}))
  assert convert.main([str(tmp_path), str(tmp_path / "out.npz")]) == 1
  assert "without model_config.json" in capsys.readouterr().err


def test_error_exit_code(tmp_path, capsys):
  (tmp_path / "x.bin").write_bytes(b"\x80")
  assert convert.main([str(tmp_path / "x.bin"), str(tmp_path / "y.npz")]) == 1
  assert "safetensors" in capsys.readouterr().err


def test_module_entry_point(tmp_path):
  checkpoint.save_npz(random_params(CONFIGS["gemma1"]), tmp_path / "a.npz")
  out = subprocess.run([sys.executable, "-m", "paligemma.convert", str(tmp_path / "a.npz"),
                        str(tmp_path / "b.npz")], capture_output=True, text=True, check=True)
  assert out.stdout.startswith("wrote ") and "parameters" in out.stdout
  assert "loading a.npz" in out.stderr  # tqdm progress bar.


def _adapters(model_config, lora, seed=0):
  """Random adapter leaves (A and B nonzero) for the weights that LoraConfig `lora` targets."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in checkpoint.param_shapes(model_config).items():
    if lora.targets_weight(name):
      for suffix, s in zip(lora_lib.SUFFIXES, lora_lib.layout(name).shapes(shape, lora.rank)):
        out[name + suffix] = (rng.standard_normal(s) * 0.1).astype(np.float32)
  return out


def test_merge_adapter(tmp_path, capsys):
  config = TINY["gemma2"]
  params = random_params(config)
  checkpoint.save_npz(params, tmp_path / "a.npz")
  lora = lora_lib.LoraConfig(rank=2, alpha=4.0, targets="peft")
  adapters = _adapters(config, lora)
  checkpoint.save_peft(adapters, dict(config, lora=lora.to_dict()), tmp_path / "ad",
                       base=str(tmp_path / "a.npz"))
  want = lora_lib.merge({**checkpoint.tree.flatten(params), **adapters}, lora)
  args = ["--adapter", str(tmp_path / "ad"), "--merge"]
  for dst in ("merged.npz", "merged_hf"):
    assert convert.main([str(tmp_path / "a.npz"), str(tmp_path / dst)] + args) == 0
    assert f"adapter {tmp_path / 'ad'} merged" in capsys.readouterr().out
    got = checkpoint.tree.flatten(checkpoint.load(tmp_path / dst)[0])
    assert sorted(got) == sorted(want)
    for name, x in want.items():
      np.testing.assert_allclose(got[name], x, atol=1e-6, err_msg=f"{dst}: {name}")
  with pytest.raises(SystemExit):
    convert.main([str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--adapter",
                  str(tmp_path / "ad")])
  assert "--adapter needs --merge" in capsys.readouterr().err
  # A LoRA run's workdir (adapter/, no params.npz) names the command that merges it.
  os.makedirs(tmp_path / "run")
  shutil.copytree(tmp_path / "ad", tmp_path / "run" / "adapter")
  (tmp_path / "run" / "config.json").write_text(json.dumps({"tokenizer": None}))
  assert convert.main([str(tmp_path / "run"), str(tmp_path / "c.npz")]) == 1
  err = capsys.readouterr().err
  assert f"{tmp_path / 'a.npz'} DST --adapter {tmp_path / 'run' / 'adapter'} --merge" in err
