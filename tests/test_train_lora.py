"""QLoRA training end to end on the shortened shapes schedule: resume after SIGKILL gives
the same losses, 4 devices (fsdp) the same as 1, checkpoints hold only the adapters, and
the run ends with a PEFT adapter directory that predict and load apply to the base; from
a checkpoint, the base stays bit-identical and the adapters and token rows move."""

import ast
import json
import signal

import numpy as np
import pytest

from test_train import _assert_same_losses, _interrupt, _losses, _run, run_on_devices
from paligemma import lora as lora_lib

# Adapters on the LLM and SigLIP q/k/v, with dropout, over a 4-bit (NF4) random base.
LORA = ["--config.lora.rank=4", "--config.lora.targets=peft", "--config.lora.dropout=0.1",
        "--config.lora.quantize=nf4", "--config.schedule=lora", "--config.optim.lr=3e-3"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("shared_lora")


@pytest.fixture(scope="module")
def reference(cache):
  workdir = cache / "reference"
  _run(cache, workdir, extra=LORA)
  return workdir


def test_run_trains_and_exports_a_peft_adapter(reference):
  losses = _losses(reference)
  assert losses[max(losses)] < 0.97 * losses[1], losses
  assert not (reference / "params.npz").exists()  # Only the adapters leave the run.
  config = json.loads((reference / "adapter" / "adapter_config.json").read_text())
  assert config["peft_type"] == "LORA" and config["r"] == 4
  # The checkpoints hold the adapters (and their optimizer state) only.
  ckpts = reference / "checkpoints"
  step = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
  meta = json.loads((ckpts / str(step) / "state" / "_METADATA").read_text())
  paths = [ast.literal_eval(p) for p in meta["tree_metadata"]]  # "('trainable', 'llm/...')"
  trained = {p[1] for p in paths if p[0] == "trainable"}
  assert trained and all(lora_lib.is_lora_leaf(n) for n in trained), trained
  # Optimizer state (Adam's mu and nu) of exactly those leaves.
  assert {p[-1] for p in paths if p[0] == "opt_state" and "/" in p[-1]} == trained


def test_resume_after_sigkill_reproduces_losses(reference, cache, tmp_path):
  workdir = tmp_path / "killed"
  _interrupt(cache, workdir, signal.SIGKILL, at_step=6, extra=LORA)
  assert not (workdir / "adapter").exists()
  _run(cache, workdir, extra=LORA)
  _assert_same_losses(workdir, reference)


def test_four_devices_fsdp_same_losses(reference, cache, tmp_path):
  workdir = tmp_path / "fsdp4"
  run_on_devices(cache, workdir, 4, extra=LORA)
  want, got = _losses(reference), _losses(workdir)
  np.testing.assert_allclose([got[s] for s in sorted(want)], [want[s] for s in sorted(want)],
                             rtol=0, atol=1e-5)


def test_frozen_base_is_bit_identical_after_training(tmp_path, monkeypatch):
  """From a checkpoint: what the run ends with is the file's weights, bit for bit, plus
  adapters that moved."""
  from paligemma import train  # pylint: disable=g-import-not-at-top
  from paligemma.checkpoint.tree import flatten  # pylint: disable=g-import-not-at-top
  from test_train import _in_process  # pylint: disable=g-import-not-at-top
  _in_process(tmp_path / "base", arg="steps=1,batch_size=8,evals=False")
  base = tmp_path / "base" / "params.npz"
  ended = {}
  monkeypatch.setattr(train, "export", lambda workdir, params, *a, **k: ended.update(
      flatten(params)))
  lora = dict(rank=4, alpha=4.0, targets="all", dropout=0.0, quantize=None, tokens="loc")
  _in_process(tmp_path / "lora", arg="steps=4,batch_size=8,evals=False", model_init=str(base),
              lora=lora, schedule="lora")
  with np.load(base) as f:
    saved = {k: f[k] for k in f.files}
  assert sorted(saved) == sorted(k for k in ended if not lora_lib.is_lora_leaf(k))
  for k, v in saved.items():
    assert np.array_equal(np.asarray(ended[k]), v), k
  b = [k for k in lora_lib.adapters(ended) if k.endswith("_lora_b")]
  assert b and all(np.any(ended[k]) for k in b)  # Every B left zero.
  # The <loc> rows started as the file's (the last 1152 but 128) and moved, in the output
  # layer (a caption task has no <loc> in its inputs).
  rows = np.asarray(ended[lora_lib.TOKENS_LEAF])
  base_rows = saved[lora_lib.EMBEDDING][-1152:-128]
  assert rows.shape == base_rows.shape and 0 < np.abs(rows - base_rows).max() < 0.1
