"""The trainer end to end on a shortened shapes schedule: CLI, resume after SIGKILL,
1 vs 4 devices, NaN stop, frozen groups, config errors."""

import json
import os
import signal
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # `configs` and `transfers`, as the trainer sees them.

from paligemma import optim  # pylint: disable=g-import-not-at-top,wrong-import-position
from paligemma import train  # pylint: disable=g-import-not-at-top,wrong-import-position
from paligemma.trainer import metrics as metrics_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from transfers import shapes  # pylint: disable=g-import-not-at-top,wrong-import-position

STEPS = 12
ARG = f"steps={STEPS},batch_size=8,evals=False"
FLAGS = ["--config.ckpt_every=4", "--config.log_every=1", "--config.progress=False"]


def _env(tmp, devices=1):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu",
             # Runs of the same program share compiled steps (bitwise the same code).
             JAX_COMPILATION_CACHE_DIR=str(tmp / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  if devices > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _command(workdir, arg=ARG, extra=()):
  return [sys.executable, "-m", "paligemma.train", f"--config=transfers/shapes.py:{arg}",
          f"--workdir={workdir}", *FLAGS, *extra]


def _run(tmp, workdir, devices=1, extra=()):
  out = subprocess.run(_command(workdir, extra=extra), cwd=REPO, env=_env(tmp, devices),
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return out


def _losses(workdir):
  """{step: loss}, the last record of each step winning (as after a resume)."""
  return {r["step"]: r["train/loss"] for r in metrics_lib.read(workdir) if "train/loss" in r}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("shared")


@pytest.fixture(scope="module")
def reference(cache):
  """An uninterrupted CLI run: its workdir."""
  workdir = cache / "reference"
  _run(cache, workdir)
  return workdir


def test_cli_run_end_to_end(reference):
  losses = _losses(reference)
  assert sorted(losses) == list(range(1, STEPS + 1))
  assert losses[STEPS] < 0.9 * losses[1], losses
  for name in ("config.json", "params.npz", "model_config.json", "metrics.jsonl"):
    assert (reference / name).exists(), name
  config = json.loads((reference / "config.json").read_text())
  assert config["input"]["batch_size"] == 8 and "tokenizer" in config
  model_config = json.loads((reference / "model_config.json").read_text())
  assert model_config["llm"]["vocab_size"] == 1920
  rec = metrics_lib.read(reference)[-1]
  assert {"step", "train/loss", "train/lr", "train/examples_per_sec"} <= set(rec)
  assert list((reference / "tensorboard").iterdir()), "no TensorBoard event file"
  with np.load(reference / "params.npz") as f:
    assert f["llm/embedder/input_embedding"].dtype == np.float32


def test_resume_after_sigkill_reproduces_losses(reference, cache, tmp_path):
  workdir = tmp_path / "killed"
  proc = subprocess.Popen(_command(workdir), cwd=REPO, env=_env(cache),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  # Kill after the step-4 checkpoint and a few more steps, mid-run.
  while time.time() < deadline and proc.poll() is None:
    done = os.path.exists(workdir / "metrics.jsonl") and \
        max(_losses(workdir), default=0) >= 6
    if done:
      break
    time.sleep(0.05)
  assert proc.poll() is None, "run ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (workdir / "params.npz").exists()
  _run(cache, workdir)
  want, got = _losses(reference), _losses(workdir)
  assert sorted(got) == sorted(want)
  np.testing.assert_allclose([got[s] for s in sorted(want)], [want[s] for s in sorted(want)],
                             rtol=0, atol=1e-6)


def test_partial_checkpoint_write_is_ignored(reference, cache, tmp_path):
  """A kill during a checkpoint write leaves a temporary directory: resume skips it."""
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "partial"
  shutil.copytree(reference, workdir)
  ckpts = workdir / "checkpoints"
  steps = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
  # Keep the step-8 checkpoint as the last good one; step 12 "was being written".
  shutil.rmtree(ckpts / str(steps[-1]))
  shutil.copytree(ckpts / str(steps[-2]), ckpts / f"{steps[-1]}.orbax-checkpoint-tmp-1")
  for p in ckpts.glob(f"{steps[-1]}.orbax-checkpoint-tmp-1/**/*"):
    if p.is_file():
      p.write_bytes(b"garbage")  # Half-written files.
  (workdir / "params.npz").unlink()
  _run(cache, workdir)
  np.testing.assert_allclose(_losses(workdir)[STEPS], _losses(reference)[STEPS], atol=1e-6)


def test_four_devices_fsdp_same_losses(reference, cache, tmp_path):
  workdir = tmp_path / "fsdp4"
  out = subprocess.run(
      [sys.executable, "-c",
       "import jax, sys; sys.argv = sys.argv[1:]; assert jax.device_count() == 4;"
       "from absl import app; from paligemma import train; app.run(train.main)",
       *_command(workdir)[2:]],
      cwd=REPO, env=_env(cache, devices=4), capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  want, got = _losses(reference), _losses(workdir)
  np.testing.assert_allclose([got[s] for s in sorted(want)], [want[s] for s in sorted(want)],
                             rtol=0, atol=1e-5)


def test_unknown_config_key_fails_naming_it(tmp_path):
  out = subprocess.run(_command(tmp_path / "w", extra=["--config.optim.lrr=1"]), cwd=REPO,
                       env=_env(tmp_path), capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert "lrr" in out.stderr
  assert not (tmp_path / "w").exists()  # Failed before any work.


def test_validate_names_a_mistyped_key():
  config = shapes.get_config(ARG)
  config.unlock()
  config.optim.lr_shedule = 1.0
  with pytest.raises(ValueError, match="optim.lr_shedule"):
    train.validate(config)


def _in_process(workdir, arg=ARG, **overrides):
  config = shapes.get_config(arg)
  config.progress = False
  config.log_every = 1
  for k, v in overrides.items():
    config[k] = v
  return config, train.train(config, str(workdir))


def _initial_params(config):
  model = train.build_model(config)
  params, _ = train.init_params(config, model, train.sharding.make_mesh(config.mesh))
  return {k: np.asarray(v) for k, v in optim.flatten(params).items()}


def test_attention_only_trains_only_attention(tmp_path):
  config, _ = _in_process(tmp_path, arg="steps=3,batch_size=8,evals=False",
                          schedule="attention_only")
  before = _initial_params(config)
  with np.load(tmp_path / "params.npz") as f:
    after = {k: f[k] for k in f.files}
  assert sorted(after) == sorted(before)
  changed = sorted(k for k in before if not np.array_equal(before[k], after[k]))
  assert changed and all(k.startswith("llm/layers/attn/") for k in changed), changed
  # Every attention weight trained; everything else bit-identical.
  assert changed == sorted(k for k in before if k.startswith("llm/layers/attn/"))


def test_frozen_groups_bit_identical_and_stateless(tmp_path):
  schedule = [("img/.*", None), ("llm/embedder/.*", None), (".*", "default")]
  config, _ = _in_process(tmp_path, arg="steps=3,batch_size=8,evals=False", schedule=schedule)
  before = _initial_params(config)
  with np.load(tmp_path / "params.npz") as f:
    after = {k: f[k] for k in f.files}
  for k in before:
    frozen = k.startswith(("img/", "llm/embedder/"))
    assert np.array_equal(before[k], after[k]) == frozen, k
  # The optimizer state holds nothing for frozen params.
  groups = optim.groups_from_config(schedule, config.optim.schedule)
  trainable, frozen = optim.partition(optim.unflatten(before), groups)
  tx, _ = optim.make_optimizer(config.optim, groups, trainable, 3)
  import jax  # pylint: disable=g-import-not-at-top
  state_size = sum(x.size for x in jax.tree.leaves(jax.eval_shape(tx.init, trainable)))
  trainable_size = sum(x.size for x in trainable.values())
  assert state_size <= 2 * trainable_size + 64  # Adam mu, nu (+ counters).
  assert not any(k.startswith("img/") for k in trainable)


@pytest.mark.parametrize("from_checkpoint", [False, True])
def test_frozen_leaves_are_made_in_frozen_dtype(tmp_path, from_checkpoint):
  # Loaded (or initialised) straight in their own dtype: frozen float16, trainable float32.
  config = shapes.get_config(ARG)
  config.schedule, config.frozen_dtype = "attention_only", "float16"
  reference = None
  if from_checkpoint:
    plain = shapes.get_config(ARG)
    reference = _initial_params(plain)
    train.checkpoint.save_npz(optim.unflatten(reference), str(tmp_path / "init.npz"))
    config.model_init = str(tmp_path / "init.npz")
  params = _initial_params(config)
  for name, arr in params.items():
    want = np.float32 if name.startswith("llm/layers/attn/") else np.float16
    assert arr.dtype == want, (name, arr.dtype)
    if reference is not None:
      np.testing.assert_array_equal(arr, reference[name].astype(want), err_msg=name)


def test_nan_in_data_stops_and_keeps_checkpoint(tmp_path, monkeypatch):
  real = train.pipeline.make_train_input

  def poisoned(*args, **kwargs):
    data = real(*args, **kwargs)
    start = kwargs["start_step"]

    class Poisoned:
      def __iter__(self):
        for step, batch in enumerate(data, start + 1):
          if step == 7:
            batch["image"] = batch["image"].copy()
            batch["image"][0, 0, 0, 0] = np.nan
          yield batch
    return Poisoned()

  monkeypatch.setattr(train.pipeline, "make_train_input", poisoned)
  with pytest.raises(train.NonFiniteLossError, match="step 7.*checkpoints/4"):
    _in_process(tmp_path, ckpt_every=4)
  ckpts = tmp_path / "checkpoints"
  assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [4]
  assert not (tmp_path / "params.npz").exists()
  # The kept checkpoint restores: resuming without the poison finishes the run.
  monkeypatch.setattr(train.pipeline, "make_train_input", real)
  _in_process(tmp_path, ckpt_every=4)
  assert (tmp_path / "params.npz").exists()
