r"""Fine-tune PaliGemma from a transfer config.

  python -m paligemma.train --config transfers/shapes.py --workdir /tmp/shapes
  python -m paligemma.train --config transfers/flickr8k.py:directory=/data/flickr8k \
      --workdir /tmp/flickr --config.optim.lr=3e-5

Running the same command in the same workdir resumes from the last checkpoint. On
several hosts every process runs the same command with the same (shared, e.g. gs://)
workdir: see docs/multihost.md. The workdir ends up holding (process 0 writes all
but the checkpoints, which every process writes its shards of):

  config.json         the config of the run (with `tokenizer`)
  checkpoints/<step>/ orbax checkpoints (paligemma/trainer/checkpoints.py)
  metrics.jsonl       one JSON object per logged step; tensorboard/ the same as events
  params.npz          the trained params (dtype `export_dtype`), model_config.json
"""

import json
import math
import os
import sys
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags
import tensorflow as tf
import tqdm

from paligemma import checkpoint
from paligemma import optim
from paligemma import sharding
from paligemma import tokenizer as tokenizer_lib
from paligemma.data import pipeline
from paligemma.data import sources
from paligemma.models import paligemma as model_lib
from paligemma.models import variants
from paligemma.trainer import checkpoints as ckpt_lib
from paligemma.trainer import metrics as metrics_lib
from paligemma.trainer import step as step_lib

# Transfer configs import their shared pieces as `configs.*` (the folder next to the
# package): make it importable whatever the working directory.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_REPO, "configs")) and _REPO not in sys.path:
  sys.path.append(_REPO)
from configs import common as common_config  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file("config", None, "Transfer config file[:arg].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and export.")


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or infinite; the run stopped without saving the bad state."""


def validate(config):
  """Raises naming any key the trainer does not know (a typo in a transfer config)."""
  base = common_config.base_config()
  for key in config:
    if key not in base:
      raise ValueError(f"Unknown config key {key!r}; valid keys: {sorted(base)}.")
  for group in ("model", "input", "optim"):
    for key in config[group]:
      if key not in base[group]:
        raise ValueError(f"Unknown config key '{group}.{key}'; valid: {sorted(base[group])}.")
  for name, ev in config.evals.items():
    for key in ("type", "data", "every"):
      if key not in ev:
        raise ValueError(f"config.evals.{name} needs a `{key}`.")


def build_model(config):
  return model_lib.Model(img=dict(config.model.img), llm=dict(config.model.llm),
                         param_dtype=config.model.param_dtype, dtype=config.model.dtype,
                         scan=config.model.scan, remat_policy=config.model.remat_policy)


def param_dtypes(config):
  """name -> dtype of each parameter: `frozen_dtype` for those config.schedule freezes
  (when set), else model.param_dtype."""
  groups = optim.groups_from_config(config.schedule, config.optim.schedule)

  def dtype_for(name):
    frozen = groups[optim.assign_groups([name], groups)[name]][1] is None
    return config.frozen_dtype if frozen and config.frozen_dtype else config.model.param_dtype

  return dtype_for


def init_params(config, model, mesh):
  """Nested params, each leaf placed with its sharding rule and in its dtype
  (param_dtypes); random or from model_init. No leaf is ever held in two dtypes: a
  3B model's frozen float16 weights are loaded as float16, not as float32 then cast."""
  rules = config.sharding_rules
  dtype_for = param_dtypes(config)

  def place(path, shape):
    name = "/".join(path)
    return jax.sharding.NamedSharding(mesh, sharding.spec_for(mesh, rules, name, shape))

  if config.model_init:
    params, model_config = checkpoint.load(
        config.model_init, config={"img": dict(config.model.img), "llm": dict(config.model.llm)},
        dtype=dtype_for, sharding=place)
    return params, model_config
  size = config.input.image_size
  text_len = config.input.text_len

  def init(rng):
    image = jnp.zeros((1, size, size, 3), jnp.float32)
    text = jnp.zeros((1, text_len), jnp.int32)
    params = optim.flatten(model.init(rng, image, text, text)["params"])
    return optim.unflatten({k: v.astype(dtype_for(k)) for k, v in params.items()})

  rng = jax.random.PRNGKey(config.seed)
  shapes = optim.flatten(jax.eval_shape(init, rng))
  out = optim.unflatten(sharding.param_shardings(mesh, rules, shapes))
  # Created directly in their shards: a big model never sits whole on one device.
  params = jax.jit(init, out_shardings=out)(rng)
  model_config = {"img": variants.resolve_vit(dict(config.model.img)),
                  "llm": variants.resolve_gemma(dict(config.model.llm))}
  return params, model_config


def total_steps(config, num_examples):
  if config.total_steps:
    return int(config.total_steps)
  steps_per_epoch = (num_examples // jax.process_count()) * jax.process_count() / \
      config.input.batch_size
  return max(1, int(math.ceil(config.total_epochs * steps_per_epoch)))


def make_evaluators(config, model, tok, data_sharding=None):
  """{name: evaluator} from config.evals (paligemma/evaluators), built once.

  data_sharding: of the batch arrays (the batch over `config.batch_axes`); each process
  feeds its own rows of the global evaluation batch.
  """
  if not config.evals:
    return {}
  try:
    from paligemma.evaluators import make_evaluator  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"config.evals is set but paligemma.evaluators cannot be imported ({e}); "
                      "set --config.evals to an empty dict to train without evaluation.") from e
  data_parallel = 1 if data_sharding is None else math.prod(
      data_sharding.mesh.shape[a] for a in jax.tree.leaves(tuple(data_sharding.spec)))
  out = {}
  for name, ev in config.evals.items():
    context = dict(model=model, tokenizer=tok, image_size=config.input.image_size,
                   text_len=config.input.text_len,
                   progress=config.progress and jax.process_index() == 0)
    out[name] = make_evaluator(ev.type, ev, data_sharding=data_sharding, **context)
    if out[name].batch_size % data_parallel:  # The evaluator may cap it at the source size.
      if jax.process_count() > 1:
        raise ValueError(f"config.evals.{name}.batch_size {out[name].batch_size} must be a "
                         f"multiple of the {data_parallel} devices of config.batch_axes "
                         f"{list(config.batch_axes)} when several processes feed it.")
      out[name] = make_evaluator(ev.type, ev, **context)  # One process: unsharded batches.
  return out


def run_evals(evaluators, config, params, step, final):
  out = {}
  for name, ev in evaluators.items():
    every = config.evals[name].every
    if final or (every and step % every == 0):
      for k, v in ev.run(params).items():
        out[f"{name}/{k}"] = float(v)
  return out


def save_json(path, obj):
  """Writes JSON to a local path or a tf.io.gfile URL (gs://...), replacing atomically."""
  tmp = path + ".tmp"
  with tf.io.gfile.GFile(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=str)
  tf.io.gfile.rename(tmp, path, overwrite=True)


class _Gathered:
  """A leaf sharded over several processes, gathered whole when numpy asks for it."""

  def __init__(self, x):
    self.x = x

  def __array__(self, dtype=None, copy=None):
    del copy
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(self.x, tiled=True), dtype)


def export(workdir, params, model_config, dtype):
  """params.npz + model_config.json, written by process 0.

  Leaf by leaf: with several processes each leaf is gathered from all of them as it is
  written (the others take part in the same gathers, in the same order), so no host
  holds more than one whole leaf beyond its shards.
  """
  flat = optim.flatten(params)
  if jax.process_count() > 1:
    flat = {k: _Gathered(v) for k, v in flat.items()}
  if jax.process_index() != 0:
    for v in flat.values():
      np.asarray(v)
    return
  path = os.path.join(workdir, "params.npz")
  if "://" in path:  # A bucket: written locally, then copied.
    with tempfile.TemporaryDirectory() as tmp:
      checkpoint.save_npz(flat, os.path.join(tmp, "params.npz"), dtype=dtype)
      tf.io.gfile.copy(os.path.join(tmp, "params.npz"), path, overwrite=True)
  else:
    checkpoint.save_npz(flat, path, dtype=dtype)
  save_json(os.path.join(workdir, "model_config.json"), model_config)


def train(config, workdir):
  """Runs (or resumes) the training described by `config` in `workdir`; returns final metrics."""
  validate(config)
  tf.io.gfile.makedirs(workdir)  # A local path, or gs://... shared by every host.
  main_process = jax.process_index() == 0
  if main_process:
    save_json(os.path.join(workdir, "config.json"), config.to_dict())

  mesh = sharding.make_mesh(config.mesh)
  batch_sh = sharding.batch_sharding(mesh, config.batch_axes, config.input.batch_size)
  tok = tokenizer_lib.load_tokenizer(config.tokenizer)
  model = build_model(config)
  params, model_config = init_params(config, model, mesh)
  # The checkpoint is the truth for the towers (the config may name only the resolution).
  model = model_lib.Model(**model_config, param_dtype=config.model.param_dtype,
                          dtype=config.model.dtype, scan=config.model.scan,
                          remat_policy=config.model.remat_policy)
  vocab = model_config["llm"]["vocab_size"]
  if tok.vocab_size > vocab:
    raise ValueError(f"Tokenizer {tok.path} has {tok.vocab_size} pieces but the model "
                     f"vocabulary (config.model.llm.vocab_size) is {vocab}.")

  # Trainable and frozen parts; only the trainable part has gradients and optimizer state.
  groups = optim.groups_from_config(config.schedule, config.optim.schedule)
  trainable, frozen = optim.partition(params, groups)
  del params

  source = sources.make_source(config.input.data.to_dict())
  steps = total_steps(config, len(source))
  tx, lr_fns = optim.make_optimizer(config.optim, groups, trainable, steps)
  param_sh = jax.tree.map(lambda x: x.sharding, trainable)
  rep = sharding.replicated(mesh)
  opt_sh = optim.state_shardings(tx, trainable, param_sh, rep)
  opt_state = jax.jit(tx.init, out_shardings=opt_sh)(trainable)
  # Host values placed on the whole mesh: with several processes orbax saves only
  # global arrays (each process passes the same value).
  rng = jax.device_put(np.asarray(jax.random.key_data(jax.random.PRNGKey(config.seed))), rep)
  step_array = lambda step: jax.device_put(np.int32(step), rep)

  # Resume from the latest checkpoint, if any.
  ckpts = ckpt_lib.Checkpoints(workdir, config.ckpt_every, config.ckpt_keep)
  start = 0
  latest = ckpts.latest_step()
  if latest is not None:
    state = dict(trainable=trainable, opt_state=opt_state, rng=rng, step=step_array(0))
    state, meta = ckpts.restore(latest, ckpt_lib.abstract(state))
    if meta["batch_size"] != config.input.batch_size:
      raise ValueError(f"{ckpts.directory}/{latest} was trained with batch_size "
                       f"{meta['batch_size']}; resume with --config.input.batch_size="
                       f"{meta['batch_size']} or use a new workdir.")
    trainable, opt_state, rng = state["trainable"], state["opt_state"], state["rng"]
    start = int(state["step"])
    logging.warning("Resumed from %s/%d", ckpts.directory, latest)

  data = pipeline.make_train_input(
      source, tok, image_size=config.input.image_size, text_len=config.input.text_len,
      batch_size=config.input.batch_size, seed=config.input.seed, start_step=start,
      on_bad_image=config.input.on_bad_image)

  lr_fn = lr_fns[sorted(lr_fns)[0]]
  train_step = jax.jit(
      step_lib.make_train_step(model, tx, lr_fn, label_smoothing=config.label_smoothing,
                               accum_steps=config.optim.accum_steps),
      donate_argnums=(0, 2),
      out_shardings=(param_sh, opt_sh, rep))
  evaluators = make_evaluators(config, model, tok, batch_sh)
  writer = metrics_lib.MetricsWriter(workdir, enabled=main_process,
                                     resume_step=start if latest is not None else None)

  def save(step):
    state = dict(trainable=trainable, opt_state=opt_state, rng=rng, step=step_array(step))
    meta = dict(step=step, examples_seen=step * config.input.batch_size,
                batch_size=config.input.batch_size, data_seed=config.input.seed)
    ckpts.save(step, state, meta)

  if start == 0 and evaluators:  # Validation metrics of the starting point.
    writer.write(0, run_evals(evaluators, config, optim.merge(trainable, frozen), 0, True))

  bar = tqdm.tqdm(total=steps, initial=start, disable=not (config.progress and main_process),
                  desc="train", unit="step", dynamic_ncols=True)
  batches = iter(data)
  last = dict(time=time.perf_counter(), step=start)
  final = {}
  for step in range(start + 1, steps + 1):
    batch = sharding.global_batch(next(batches), batch_sh)
    trainable, opt_state, m = train_step(trainable, frozen, opt_state, batch,
                                         jnp.int32(step - 1))
    loss = float(m["loss"])
    if not math.isfinite(loss):
      good = ckpts.latest_step()
      raise NonFiniteLossError(
          f"Loss is {loss} at step {step}; stopped without saving. Last good checkpoint: "
          f"{'none' if good is None else f'{ckpts.directory}/{good}'}. Lower "
          "config.optim.lr, set config.optim.grad_clip_norm, or check the data of this step.")
    final = {"train/loss": loss, "train/lr": float(m["lr"])}
    bar.update(1)
    if step % config.log_every == 0 or step == steps:
      now = time.perf_counter()
      rate = (step - last["step"]) * config.input.batch_size / max(now - last["time"], 1e-9)
      last.update(time=now, step=step)
      final["train/examples_per_sec"] = rate
      final["train/grad_norm"] = float(m["grad_norm"])
      final.update(run_evals(evaluators, config, optim.merge(trainable, frozen), step,
                             step == steps))
      writer.write(step, final)
      bar.set_postfix(loss=f"{loss:.4f}", lr=f"{final['train/lr']:.2e}",
                      ex_s=f"{rate:.1f}", refresh=False)
    if ckpts.due(step) or step == steps:
      save(step)
  bar.close()
  # Stops the input threads now rather than during interpreter shutdown.
  getattr(batches, "close", lambda: None)()
  writer.close()
  export(workdir, optim.merge(trainable, frozen), model_config, config.export_dtype)
  ckpts.close()
  return final


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments {argv[1:]}; config overrides are "
                         "--config.key=value.")
  config = _CONFIG.value
  # Orbax logs every checkpoint step at INFO; keep the console for the progress bar.
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  distributed = sharding.initialize_distributed(config.distributed)
  if jax.process_index() != 0 and not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)  # Process 0 speaks for all.
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required (checkpoints, metrics and params go there).")
  train(config, _WORKDIR.value)
  if distributed:
    # All processes leave together (a barrier). Process 0 hosts the coordination
    # service; a process still tearing down when it is gone aborts. (After an error
    # there is no barrier: the others must not wait for a process that left.)
    jax.distributed.shutdown()


if __name__ == "__main__":
  app.run(main)
