r"""Fine-tune PaliGemma from a transfer config.

  python -m paligemma.train --config transfers/shapes.py --workdir /tmp/shapes
  python -m paligemma.train --config transfers/flickr8k.py:directory=/data/flickr8k \
      --workdir /tmp/flickr --config.optim.lr=3e-5

Running the same command in the same workdir resumes from the last checkpoint; Ctrl-C
(SIGINT) or SIGTERM (preemption) saves one at the current step first. On
several hosts every process runs the same command with the same (shared, e.g. gs://)
workdir: see docs/multihost.md. The workdir ends up holding (process 0 writes all
but the checkpoints, which every process writes its shards of):

  lock                held while a training runs here (paligemma/trainer/lock.py)
  config.json         the config of the run (with `tokenizer`)
  checkpoints/<step>/ orbax checkpoints (paligemma/trainer/checkpoints.py)
  metrics.jsonl       one JSON object per logged step; tensorboard/ the same as events
  params.npz          the trained params (dtype `export_dtype`), model_config.json
  adapter/            instead, under LoRA: the adapters as a PEFT adapter directory
"""

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
import tensorflow as tf
import tqdm

from paligemma import checkpoint
from paligemma import config as config_lib
from paligemma import json_files
from paligemma import lora as lora_lib
from paligemma import optim
from paligemma import sharding
from paligemma import tokenizer as tokenizer_lib
from paligemma.data import pipeline
from paligemma.data import sources
from paligemma.models import build as build_lib
from paligemma.trainer import checkpoints as ckpt_lib
from paligemma.trainer import data_progress
from paligemma.trainer import interrupt
from paligemma.trainer import lock as lock_lib
from paligemma.trainer import metrics as metrics_lib
from paligemma.trainer import step as step_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and export.")


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or infinite; the run stopped without saving the bad state."""


validate = config_lib.validate


def frozen_names(config):
  """name -> whether config.schedule freezes the parameter."""
  groups = optim.groups_from_config(config.schedule, config.optim.schedule)
  return lambda name: groups[optim.assign_groups([name], groups)[name]][1] is None


def param_dtypes(config):
  """name -> dtype of each parameter: `frozen_dtype` for those config.schedule freezes
  (when set), else model.param_dtype."""
  is_frozen = frozen_names(config)

  def dtype_for(name):
    frozen = is_frozen(name)
    return config.frozen_dtype if frozen and config.frozen_dtype else config.model.param_dtype

  return dtype_for


def init_params(config, model, mesh):
  """Nested params, each leaf placed with its sharding rule and in its dtype
  (param_dtypes); random or from model_init. No leaf is ever held in two dtypes: a
  3B model's frozen float16 weights are loaded as float16, not as float32 then cast."""
  rules = config.sharding_strategy
  dtype_for = param_dtypes(config)

  quantize = config.lora.rank and config.lora.quantize
  is_frozen = frozen_names(config)

  def quantize_plan(name, shape):
    return lora_lib.quantize_plan(name, shape, quantize) if quantize and is_frozen(name) else None

  def place(path, shape):
    name = "/".join(path)
    if quantize_plan(name, shape) is not None:
      # QLoRA, a weight without layers: into host memory; quantize_frozen puts the
      # 4/8-bit copy on the devices.
      return jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    return jax.sharding.NamedSharding(mesh, sharding.spec_for(mesh, rules, name, shape))

  def quantize_layers(name, shape):
    """QLoRA: a frozen stacked weight quantized a layer at a time as it loads, so the
    host never holds more than one layer of it."""
    lead = quantize_plan(name, shape)
    return lora_lib.layer_quantizer(quantize, lead, sharding.replicated(mesh)) if lead else None

  text_len = config.input.text_len
  if config.model_init:
    params, model_config = checkpoint.load(
        config.model_init, config={"img": dict(config.model.img), "llm": dict(config.model.llm)},
        dtype=dtype_for, sharding=place, transform=quantize_layers)
    if model.lora:
      model = build_lib.build_model(config.model, lora=model.lora, **model_config)
      params = optim.flatten(params)
      params = optim.merge(init_adapters(config, model, mesh, params), params)
      model_config["lora"] = model.lora.to_dict()
    return params, model_config

  def init(rng):
    params = optim.flatten(build_lib.initial_params(model, rng, text_len))
    return optim.unflatten({k: v.astype(dtype_for(k)) for k, v in params.items()})

  rng = jax.random.PRNGKey(config.seed)
  shapes = optim.flatten(build_lib.abstract_params(model, text_len))
  out = optim.unflatten(sharding.param_shardings(mesh, rules, shapes))
  # Created directly in their shards: a big model never sits whole on one device.
  params = jax.jit(init, out_shardings=out)(rng)
  model_config = {"img": model.img.to_dict(), "llm": model.llm.to_dict()}
  if model.lora:
    model_config["lora"] = model.lora.to_dict()
  return params, model_config


def init_adapters(config, model, mesh, base):
  """Flat {name: adapter} of `model` (fresh: A random, B zero, trainable token rows
  those of the loaded embedding in `base`) from config.seed, placed by the sharding
  rules. Only the adapters are computed: XLA drops the rest of the random init, so this
  costs no memory for the base."""
  rules = config.sharding_strategy
  shapes = optim.flatten(build_lib.abstract_params(model, config.input.text_len))
  shapes = lora_lib.adapters(shapes)
  if not shapes:
    raise config_lib.ConfigError(
        f"config.lora.targets={config.lora.targets!r} matches no weight of the model; the "
        f"weights that take adapters are named like {lora_lib.TARGETS['all']!r}.")

  def init(rng):
    params = optim.flatten(build_lib.initial_params(model, rng, config.input.text_len))
    return {k: params[k].astype(config.model.param_dtype) for k in shapes}

  out = sharding.param_shardings(mesh, rules, shapes)
  adapters = jax.jit(init, out_shardings=out)(jax.random.PRNGKey(config.seed))
  if lora_lib.TOKENS_LEAF in adapters:
    e = base[lora_lib.EMBEDDING]
    ids = jnp.asarray(lora_lib.token_ids(model.lora.tokens, e.shape[0]))
    rows = adapters[lora_lib.TOKENS_LEAF]
    adapters[lora_lib.TOKENS_LEAF] = jax.jit(
        lambda e: jnp.take(e, ids, axis=0).astype(rows.dtype),
        out_shardings=out[lora_lib.TOKENS_LEAF])(e)
  return adapters


def check_lora_partition(trainable, frozen):
  """Under LoRA the adapters train and the weights they adapt stay frozen."""
  frozen_adapters = sorted(k for k in frozen if lora_lib.is_lora_leaf(k))
  if frozen_adapters:
    raise config_lib.ConfigError(
        f"config.schedule freezes the LoRA adapter {frozen_adapters[0]}: use "
        "--config.schedule=lora, or give `.*_lora_(a|b|tokens)` a schedule in your rules.")
  adapted = sorted(lora_lib.base_name(k) for k in trainable if k.endswith("_lora_a")
                   and lora_lib.base_name(k) in trainable)
  if adapted:
    raise config_lib.ConfigError(
        f"config.schedule trains {adapted[0]}, which carries a LoRA adapter: freeze the "
        "adapted weights (--config.schedule=lora trains the adapters only).")


def total_steps(config, num_examples):
  if config.total_steps:
    return int(config.total_steps)
  per_epoch = pipeline.steps_per_epoch(num_examples, config.input.batch_size,
                                       jax.process_count())
  return max(1, int(math.ceil(config.total_epochs * per_epoch)))


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
                   text_len=config.input.text_len, antialias=config.input.antialias,
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


class _Gathered:
  """A leaf sharded over several processes, gathered whole when numpy asks for it."""

  def __init__(self, x):
    self.x = x

  def __array__(self, dtype=None, copy=None):
    del copy
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(self.x, tiled=True), dtype)


def export_adapter(workdir, adapters, model_config, base):
  """{workdir}/adapter: the LoRA adapters as a PEFT adapter directory (loads in
  transformers + peft, and in `checkpoint.load(base, adapter=...)`)."""
  adapters = {k: np.asarray(v, np.float32) for k, v in adapters.items()}
  directory = os.path.join(workdir, ADAPTER_DIR)
  if "://" in directory:  # A bucket: written locally, then copied.
    with tempfile.TemporaryDirectory() as tmp:
      checkpoint.save_peft(adapters, model_config, tmp, base=base)
      for name in tf.io.gfile.listdir(tmp):
        tf.io.gfile.copy(os.path.join(tmp, name), f"{directory}/{name}", overwrite=True)
  else:
    checkpoint.save_peft(adapters, model_config, directory, base=base)


ADAPTER_DIR = "adapter"


def export(workdir, params, model_config, dtype, base=None):
  """params.npz + model_config.json, written by process 0; under LoRA only the adapters,
  as a PEFT adapter directory `adapter/` (export_adapter) for the base `base`.

  Leaf by leaf: with several processes each leaf is gathered from all of them as it is
  written (the others take part in the same gathers, in the same order), so no host
  holds more than one whole leaf beyond its shards.
  """
  flat = optim.flatten(params)
  if "lora" in model_config:
    flat = lora_lib.adapters(flat)
  if jax.process_count() > 1:
    flat = {k: _Gathered(v) for k, v in flat.items()}
  if jax.process_index() != 0:
    for v in flat.values():
      np.asarray(v)
    return
  if "lora" in model_config:
    export_adapter(workdir, flat, model_config, base)
    return
  path = os.path.join(workdir, "params.npz")
  if "://" in path:  # A bucket: written locally, then copied.
    with tempfile.TemporaryDirectory() as tmp:
      checkpoint.save_npz(flat, os.path.join(tmp, "params.npz"), dtype=dtype)
      tf.io.gfile.copy(os.path.join(tmp, "params.npz"), path, overwrite=True)
  else:
    checkpoint.save_npz(flat, path, dtype=dtype)
  json_files.write_json(os.path.join(workdir, "model_config.json"), model_config)


def check_tokenizer(config, tok):
  """Refuses a tokenizer that does not fit `model_init`'s vocabulary.

  A tokenizer with fewer pieces than the checkpoint has rows is another tokenizer (the
  embedding would be trimmed to it, the pretrained token ids meaning nothing); more
  pieces are accepted only with config.model.llm.vocab_size set to them (new tokens).
  """
  if not config.model_init:
    return
  rows = checkpoint.describe(config.model_init).config["llm"]["vocab_size"]
  if tok.vocab_size == rows or tok.vocab_size == config.model.llm.get("vocab_size", -1) > rows:
    return
  raise config_lib.ConfigError(
      f"Tokenizer {tok.path} has {tok.vocab_size:,} pieces but model_init "
      f"{config.model_init} has a vocabulary of {rows:,}; set config.tokenizer to the "
      "checkpoint's tokenizer (paligemma_tokenizer.model for the released ones), or to "
      "extend the vocabulary set config.model.llm.vocab_size to the tokenizer's size.")


def train(config, workdir):
  """Runs (or resumes) the training described by `config` in `workdir`; returns final metrics.

  Raises interrupt.Interrupted (after saving a checkpoint) on SIGINT / SIGTERM, and
  lock.WorkdirLockedError when another training holds `workdir`.
  """
  validate(config)
  tf.io.gfile.makedirs(workdir)  # A local path, or gs://... shared by every host.
  main_process = jax.process_index() == 0
  lock = lock_lib.WorkdirLock(workdir)
  if main_process:
    lock.acquire()
  try:
    return _train(config, workdir, main_process)
  finally:
    if main_process:
      lock.release()


def _train(config, workdir, main_process):
  tok = tokenizer_lib.load_tokenizer(config.tokenizer)
  check_tokenizer(config, tok)
  if main_process:
    json_files.write_json(os.path.join(workdir, "config.json"), config.to_dict())

  mesh = sharding.make_mesh(config.mesh)
  batch_sh = sharding.batch_sharding(mesh, config.batch_axes, config.input.batch_size)
  model = build_lib.build_model(config.model, lora=config.lora.to_dict())
  params, model_config = init_params(config, model, mesh)
  # The checkpoint is the truth for the towers (the config may name only the resolution).
  model = build_lib.build_model(config.model, **model_config)
  vocab = model_config["llm"]["vocab_size"]
  if tok.vocab_size > vocab:
    raise ValueError(f"Tokenizer {tok.path} has {tok.vocab_size} pieces but the model "
                     f"vocabulary (config.model.llm.vocab_size) is {vocab}.")

  # Trainable and frozen parts; only the trainable part has gradients and optimizer state.
  groups = optim.groups_from_config(config.schedule, config.optim.schedule)
  trainable, frozen = optim.partition(params, groups)
  del params
  counts = [sum(math.prod(x.shape) for x in part.values()) for part in (trainable, frozen)]
  logging.warning("Training %s of %s parameters (%.2f%%).", f"{counts[0]:,}",
                  f"{sum(counts):,}", 100 * counts[0] / sum(counts))
  if model.lora:
    check_lora_partition(trainable, frozen)
    if model.lora.quantize:  # QLoRA: the frozen matmul weights stored as quant.QArray.
      frozen = lora_lib.quantize_frozen(frozen, model.lora.quantize, sharding.replicated(mesh))

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
  start, meta = 0, {}
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

  progress = data_progress.DataProgress(meta, config.input.batch_size // jax.process_count())
  data = pipeline.make_train_input(
      source, tok, image_size=config.input.image_size, text_len=config.input.text_len,
      batch_size=config.input.batch_size, seed=config.input.seed,
      start_position=progress.position, on_bad_image=config.input.on_bad_image,
      antialias=config.input.antialias)

  lr_fn = lr_fns[sorted(lr_fns)[0]]
  train_step = jax.jit(
      step_lib.make_train_step(model, tx, lr_fn, label_smoothing=config.label_smoothing,
                               accum_steps=config.optim.accum_steps, dropout_seed=config.seed),
      donate_argnums=(0, 2), static_argnums=5,
      out_shardings=(param_sh, opt_sh, rep))
  # One process sees its whole batch and can cut the output layer to its loss tokens
  # (step.loss_length); several would each see a part, and must run the same program.
  loss_length = step_lib.loss_length if jax.process_count() == 1 else lambda _: None
  evaluators = make_evaluators(config, model, tok, batch_sh)
  writer = metrics_lib.MetricsWriter(workdir, enabled=main_process,
                                     resume_step=start if latest is not None else None)

  def save(step):
    state = dict(trainable=trainable, opt_state=opt_state, rng=rng, step=step_array(step))
    meta = dict(step=step, examples_seen=step * config.input.batch_size,
                batch_size=config.input.batch_size, data_seed=config.input.seed,
                **progress.meta())
    ckpts.save(step, state, meta)

  if start == 0 and evaluators:  # Validation metrics of the starting point.
    writer.write(0, run_evals(evaluators, config, optim.merge(trainable, frozen), 0, True))

  bar = tqdm.tqdm(total=steps, initial=start, disable=not (config.progress and main_process),
                  desc="train", unit="step", dynamic_ncols=True)
  batches = iter(data)
  last = dict(time=time.perf_counter(), step=start)
  final = {}
  try:
    with interrupt.stop_requests() as requests:
      for step in range(start + 1, steps + 1):
        batch = next(batches)
        progress.consume(batch)
        loss_len = loss_length(batch["mask_loss"])
        batch = sharding.global_batch(batch, batch_sh)
        trainable, opt_state, m = train_step(trainable, frozen, opt_state, batch,
                                             jnp.int32(step - 1), loss_len)
        loss = float(m["loss"])
        if not math.isfinite(loss):
          good = ckpts.latest_step()
          raise NonFiniteLossError(
              f"Loss is {loss} at step {step}; stopped without saving. Last good checkpoint: "
              f"{'none' if good is None else f'{ckpts.directory}/{good}'}. Lower "
              "config.optim.lr, set config.optim.grad_clip_norm, or check the data of this "
              "step.")
        final = {"train/loss": loss, "train/lr": float(m["lr"])}
        bar.update(1)
        if step % config.log_every == 0 or step == steps:
          now = time.perf_counter()
          rate = (step - last["step"]) * config.input.batch_size / max(now - last["time"], 1e-9)
          last.update(time=now, step=step)
          final["train/examples_per_sec"] = rate
          final["train/grad_norm"] = float(m["grad_norm"])
          final.update(progress.totals())
          final.update(run_evals(evaluators, config, optim.merge(trainable, frozen), step,
                                 step == steps))
          writer.write(step, final)
          bar.set_postfix(loss=f"{loss:.4f}", lr=f"{final['train/lr']:.2e}",
                          ex_s=f"{rate:.1f}", refresh=False,
                          **{k[5:]: final[k] for k in progress.KEYS if final[k]})
        signum = interrupt.agreed_signal(requests)
        if ckpts.due(step) or step == steps or signum:
          save(step)
        if signum and step < steps:
          raise interrupt.Interrupted(signum, step, ckpts.directory)
  finally:
    bar.close()
    # Stops the input threads now rather than during interpreter shutdown.
    getattr(batches, "close", lambda: None)()
    writer.close()
    if main_process:  # (This process's counts: no collective on the way out of an error.)
      _data_summary(data, progress.totals(local=True), config.input.text_len)
  export(workdir, optim.merge(trainable, frozen), model_config, config.export_dtype,
         base=config.model_init)
  ckpts.close()
  return final


def _data_summary(data, totals, text_len):
  """Logs what the data lost: skipped images and truncated examples (none: one INFO line)."""
  stats = data.stats
  lines = []
  if totals["data/skipped"]:
    first = next(iter(stats.skipped.items()), None)
    lines.append(f"{totals['data/skipped']} examples skipped for unreadable images"
                 + (f" (e.g. {first[0]}: {first[1]})" if first else ""))
  if totals["data/truncated"]:
    first = next(iter(stats.truncated), None)
    lines.append(f"{totals['data/truncated']} examples truncated to text_len={text_len} "
                 + (f"(e.g. {first}; " if first else "(") +
                 "raise config.input.text_len to keep them whole)")
  if lines:
    logging.warning("Data: %s.", "; ".join(lines))
  else:
    logging.info("Data: no example skipped or truncated.")


def main(argv, config):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments {argv[1:]}; config overrides are "
                         "--config.key=value.")
  if config is None:
    raise app.UsageError("--config is required, e.g. --config transfers/shapes.py")
  # Orbax logs every checkpoint step at INFO; keep the console for the progress bar.
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  distributed = sharding.initialize_distributed(config.distributed)
  if jax.process_index() != 0 and not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)  # Process 0 speaks for all.
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required (checkpoints, metrics and params go there).")
  try:
    train(config, _WORKDIR.value)
  except interrupt.Interrupted as e:
    if jax.process_index() == 0:
      print(f"{e} Resume with the same command:\n  python -m paligemma.train "
            + " ".join(sys.argv[1:]), file=sys.stderr)
    sys.exit(128 + e.signum)
  except lock_lib.WorkdirLockedError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  if distributed:
    # All processes leave together (a barrier). Process 0 hosts the coordination
    # service; a process still tearing down when it is gone aborts. (After an error
    # there is no barrier: the others must not wait for a process that left.)
    jax.distributed.shutdown()


if __name__ == "__main__":
  config_lib.run(main)
