"""`python -m paligemma.convert`: every direction, dtype casts, summary line, errors."""

import subprocess
import sys

import ml_dtypes
import numpy as np

from paligemma import checkpoint
from paligemma import convert
from test_checkpoint_npz import CONFIGS, assert_same, random_params


def test_npz_hf_npz(tmp_path, capsys):
  params = random_params(CONFIGS["gemma2"])
  checkpoint.save_npz(params, tmp_path / "a.npz")
  assert convert.main([str(tmp_path / "a.npz"), str(tmp_path / "hf")]) == 0
  line = capsys.readouterr().out.strip().splitlines()[-1]
  count = sum(int(np.prod(s)) for s in checkpoint.param_shapes(CONFIGS["gemma2"]).values())
  assert f"{count:,} parameters" in line and "(hf)" in line
  assert "mu/16 + gemma2_tiny at 32px" in line and "bytes" in line
  assert convert.main([str(tmp_path / "hf"), str(tmp_path / "b.npz")]) == 0
  loaded, _ = checkpoint.load(tmp_path / "b.npz")
  # The sliding window is not in an .npz; everything else survives.
  assert_same(params, loaded)


def test_dtype_and_explicit_format(tmp_path, capsys):
  params = random_params(CONFIGS["gemma1"])
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
