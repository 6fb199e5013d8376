"""The trainer end to end on a shortened shapes schedule: CLI, resume after SIGKILL (also
past unreadable images) and after Ctrl-C, 1 vs 4 devices, NaN stop, frozen groups,
config errors, the workdir lock, a tokenizer that does not fit model_init."""

import json
import os
import re
import signal
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = os.path.join(REPO, "transfers", "shapes.py")

from paligemma import config as config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from paligemma import optim  # pylint: disable=g-import-not-at-top,wrong-import-position
from paligemma import train  # pylint: disable=g-import-not-at-top,wrong-import-position
from paligemma.data import shapes as shapes_data  # pylint: disable=g-import-not-at-top,wrong-import-position
from paligemma.trainer import lock as lock_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from paligemma.trainer import metrics as metrics_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

STEPS = 12
ARG = f"steps={STEPS},batch_size=8,evals=False"
FLAGS = ["--config.ckpt_every=4", "--config.log_every=1", "--config.progress=False"]


def _shapes_config(arg):
  """transfers/shapes.py:arg, loaded as the trainer's --config loads it."""
  return config_lib.load(f"{SHAPES}:{arg}")


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


def _run(tmp, workdir, devices=1, extra=(), arg=ARG):
  out = subprocess.run(_command(workdir, arg=arg, extra=extra), cwd=REPO,
                       env=_env(tmp, devices), capture_output=True, text=True, timeout=300)
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


def _interrupt(cache, workdir, sig, at_step, extra=(), arg=ARG):
  """Starts a run, sends `sig` once it logged `at_step`; returns the finished process."""
  proc = subprocess.Popen(_command(workdir, arg=arg, extra=extra), cwd=REPO, env=_env(cache),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(workdir / "metrics.jsonl") and \
        max(_losses(workdir), default=0) >= at_step:
      break
    time.sleep(0.05)
  assert proc.poll() is None, "run ended before it could be stopped"
  proc.send_signal(sig)
  proc.stderr_text = proc.communicate(timeout=120)[1]
  return proc


def _assert_same_losses(workdir, reference):
  want, got = _losses(reference), _losses(workdir)
  assert sorted(got) == sorted(want)
  np.testing.assert_allclose([got[s] for s in sorted(want)], [want[s] for s in sorted(want)],
                             rtol=0, atol=1e-6)


def test_resume_after_sigkill_reproduces_losses(reference, cache, tmp_path):
  workdir = tmp_path / "killed"
  # Killed after the step-4 checkpoint and a few more steps, mid-run.
  _interrupt(cache, workdir, signal.SIGKILL, at_step=6)
  assert not (workdir / "params.npz").exists()
  assert (workdir / "lock").exists()  # Left behind by the kill; the resume takes it over.
  _run(cache, workdir)
  _assert_same_losses(workdir, reference)
  assert not (workdir / "lock").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])  # Ctrl-C; preemption.
def test_signal_saves_at_the_current_step_and_resumes(reference, cache, tmp_path, sig):
  workdir = tmp_path / "interrupted"
  # No scheduled checkpoint: the one there is the interruption's.
  proc = _interrupt(cache, workdir, sig, at_step=5, extra=["--config.ckpt_every=0"])
  assert proc.returncode == 128 + sig, proc.stderr_text[-3000:]
  stopped = int(re.search(rf"Stopped by {sig.name} at step (\d+)", proc.stderr_text).group(1))
  assert "Resume with the same command" in proc.stderr_text
  assert 5 <= stopped < STEPS, stopped
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [stopped]
  assert max(_losses(workdir)) == stopped and not (workdir / "params.npz").exists()
  _run(cache, workdir)
  _assert_same_losses(workdir, reference)


BAD_STEPS, BAD_BATCH, BAD_IMAGE = 16, 2, 3


@pytest.fixture(scope="module")
def bad_images(cache):
  """A 7-line jsonl of shapes PNGs whose 4th image is missing; (override, reference run)."""
  folder = cache / "bad_images"
  folder.mkdir()
  source = shapes_data.make(num_examples=7, seed=5, image_size=32)
  lines = []
  for i in range(len(source)):
    ex = source[i]
    if i != BAD_IMAGE:
      from PIL import Image  # pylint: disable=g-import-not-at-top
      Image.fromarray(ex["image"]).save(folder / f"{i}.png")
    lines.append(json.dumps({"image": f"{i}.png", "prefix": ex["prefix"], "suffix": ex["suffix"]}))
  (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
  override = [f"--config.input.data={{'name': 'jsonl', 'path': '{folder / 'data.jsonl'}'}}"]
  reference = cache / "bad_images_reference"
  _run(cache, reference, extra=override, arg=f"steps={BAD_STEPS},batch_size={BAD_BATCH},"
       "evals=False")
  return override, reference


def test_resume_past_skipped_images_reproduces_losses(bad_images, cache, tmp_path):
  override, reference = bad_images
  workdir = tmp_path / "killed_bad"
  arg = f"steps={BAD_STEPS},batch_size={BAD_BATCH},evals=False"
  _interrupt(cache, workdir, signal.SIGKILL, at_step=10, extra=override, arg=arg)
  _run(cache, workdir, extra=override, arg=arg)
  _assert_same_losses(workdir, reference)
  # The skip count, by hand: the missing image's visits in the stream before the last
  # trained example (7 examples a permutation; BAD_STEPS x BAD_BATCH trained).
  good = skipped = 0
  for index in train.pipeline.train_indices(7, 0, 0, 1):
    if good == BAD_STEPS * BAD_BATCH:
      break
    skipped += index == BAD_IMAGE
    good += index != BAD_IMAGE
  for run in (reference, workdir):
    last = metrics_lib.read(run)[-1]
    assert last["step"] == BAD_STEPS
    assert last["data/skipped"] == skipped > 0 and last["data/truncated"] == 0


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


def run_on_devices(cache, workdir, devices, extra=(), arg=ARG):
  """The CLI run on `devices` virtual CPU devices (tests/workers/train_on_devices.py)."""
  out = subprocess.run(
      [sys.executable, os.path.join(REPO, "tests", "workers", "train_on_devices.py"),
       str(devices), *_command(workdir, arg=arg, extra=extra)[3:]],
      cwd=REPO, env=_env(cache, devices=devices), capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]


def check_resume_after_sigkill(cache, tmp_path, extra=(), arg=ARG):
  """An uninterrupted run, and one killed at step 6 and resumed: the same losses (1e-6).
  Returns the resumed workdir."""
  reference, killed = tmp_path / "reference", tmp_path / "killed"
  _run(cache, reference, extra=extra, arg=arg)
  _interrupt(cache, killed, signal.SIGKILL, at_step=6, extra=extra, arg=arg)
  _run(cache, killed, extra=extra, arg=arg)
  _assert_same_losses(killed, reference)
  return killed


def test_four_devices_fsdp_same_losses(reference, cache, tmp_path):
  workdir = tmp_path / "fsdp4"
  run_on_devices(cache, workdir, 4)
  want, got = _losses(reference), _losses(workdir)
  np.testing.assert_allclose([got[s] for s in sorted(want)], [want[s] for s in sorted(want)],
                             rtol=0, atol=1e-5)


def test_second_training_in_a_workdir_is_refused(tmp_path):
  with lock_lib.WorkdirLock(tmp_path):
    with pytest.raises(lock_lib.WorkdirLockedError, match=f"process {os.getpid()} on host"):
      _in_process(tmp_path)
  assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "config.json").exists()


def test_tokenizer_must_fit_model_init(tmp_path):
  """A tiny-tokenizer run from a checkpoint of another vocabulary is refused, not trimmed."""
  config = _shapes_config(ARG)
  config.model.llm.vocab_size = 2048
  train.checkpoint.save_npz(optim.unflatten(_initial_params(config)), str(tmp_path / "i.npz"))
  config = _shapes_config(ARG)
  config.model_init = str(tmp_path / "i.npz")  # The config asks for 1,920 rows.
  with pytest.raises(config_lib.ConfigError, match=r"1,920 pieces but model_init .* 2,048"):
    train.train(config, str(tmp_path / "w"))
  config.model.llm.vocab_size = 2048  # Still the 1,920-piece tokenizer: refused too.
  with pytest.raises(config_lib.ConfigError, match="set config.tokenizer"):
    train.train(config, str(tmp_path / "w"))


def test_validate_names_a_mistyped_key():
  config = _shapes_config(ARG)
  config.unlock()
  config.optim.lr_shedule = 1.0
  with pytest.raises(ValueError, match="optim.lr_shedule"):
    train.validate(config)


def _in_process(workdir, arg=ARG, **overrides):
  config = _shapes_config(arg)
  config.progress = False
  config.log_every = 1
  for k, v in overrides.items():
    config[k] = v
  return config, train.train(config, str(workdir))


def _initial_params(config):
  model = train.build_lib.build_model(config.model)
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
  config = _shapes_config(ARG)
  config.schedule, config.frozen_dtype = "attention_only", "float16"
  reference = None
  if from_checkpoint:
    plain = _shapes_config(ARG)
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
    start = kwargs["start_position"] // kwargs["batch_size"]  # (No image skipped here.)

    class Poisoned:
      stats = data.stats

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
