"""What every evaluator shares: config checking, the data, and the decode-then-score loop.

A decoding evaluator (captions, VQA, detection, exact match) decodes every example of
its source once, in order, then scores the list of predictions; subclasses only write
`score(predictions) -> dict[str, float]` (and may add fields to the jsonl records).
"""

import os

import jax
import numpy as np
import tqdm

from paligemma import decode
from paligemma.data import pipeline
from paligemma.data import sources
from paligemma.evaluators import predictions as predictions_lib

COMMON_KEYS = ("type", "every", "data", "batch_size", "prompt", "num_examples")
DECODE_KEYS = ("max_decode_len", "sampler", "seed")


class PromptSource:
  """A source whose examples get `prompt.format(**example)` as prefix, first N only."""

  def __init__(self, source, prompt=None, num_examples=None):
    self._source, self._prompt = source, prompt
    self._len = len(source) if num_examples is None else min(int(num_examples), len(source))
    self.name = getattr(source, "name", repr(source))

  def __len__(self):
    return self._len

  def __getitem__(self, index):
    if not 0 <= index < self._len:
      raise IndexError(f"example {index} out of range({self._len})")
    ex = self._source[index]
    if self._prompt is None:
      return ex
    try:
      return dict(ex, prefix=self._prompt.format(**ex))
    except (KeyError, IndexError, ValueError) as e:
      raise ValueError(f"Evaluator `prompt` {self._prompt!r} cannot be filled from example "
                       f"{ex.get('id')!r} of {self.name} ({e!r}); fields: {sorted(ex)}.") from None

  def __repr__(self):
    return f"<{self.name}: {self._len} examples>"


class Evaluator:
  """Base: checks the config keys and builds the source (lazily read)."""
  KEYS = ()  # Evaluator-specific config keys, besides COMMON_KEYS.
  DEFAULTS = {}

  def __init__(self, config, *, model, tokenizer, image_size, text_len, predictions_dir=None,
               eval_name=None, data_sharding=None, progress=True, antialias=True):
    config = dict(config)
    valid = COMMON_KEYS + self.KEYS
    unknown = sorted(set(config) - set(valid))
    if unknown:
      raise ValueError(f"Unknown key(s) {unknown} in the config of evaluator "
                       f"{eval_name or config.get('type')!r}; valid keys: {sorted(valid)}.")
    for key in ("data", "batch_size"):
      if config.get(key) is None:
        raise ValueError(f"Evaluator {eval_name or config.get('type')!r} needs `{key}` in its config.")
    self.config = {**self.DEFAULTS, **config}
    self.name = eval_name or config.get("type") or type(self).__name__
    self.model, self.tokenizer = model, tokenizer
    self.image_size, self.text_len = image_size, int(text_len)
    self.antialias = bool(antialias)  # The run's input.antialias, as in training.
    self.predictions_dir, self.data_sharding, self.progress = predictions_dir, data_sharding, progress
    data = config["data"]
    data = dict(data) if hasattr(data, "keys") else data
    self.source = PromptSource(sources.make_source(data), config.get("prompt"),
                               config.get("num_examples"))
    self.batch_size = min(int(config["batch_size"]), len(self.source) * jax.process_count())

  def run(self, params, *, step=None):
    """dict[str, float] metrics of `params` on the whole source."""
    raise NotImplementedError

  def _put(self, x):
    """A host batch array -> a (possibly sharded, multi-process) jax array."""
    if self.data_sharding is None:
      return x
    return jax.make_array_from_process_local_data(self.data_sharding, np.asarray(x))

  def _bar(self, iterable, total):
    return tqdm.tqdm(iterable, total=total, desc=f"eval {self.name}", unit="batch",
                     disable=not self.progress, leave=False)


def gather(x):
  """Numpy value of a (possibly multi-process) array, all processes' rows concatenated."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


class DecodingEvaluator(Evaluator):
  """Decodes every example, then `score`s the predictions (see the module docstring)."""
  KEYS = DECODE_KEYS
  DEFAULTS = {"max_decode_len": 32, "sampler": "greedy", "seed": 0}

  def __init__(self, config, **context):
    super().__init__(config, **context)
    self.decoder = decode.Decoder(self.model, max_decode_len=int(self.config["max_decode_len"]),
                                  sampler=self.config["sampler"])

  def predict(self, params):
    """list[dict] per example, source order: index, id, prompt, prediction, references,
    tokens, logprobs (numpy)."""
    data = pipeline.make_eval_input(self.source, self.tokenizer, image_size=self.image_size,
                                    text_len=self.text_len, batch_size=self.batch_size,
                                    antialias=self.antialias)
    out = {}
    keys = ("image", "text", "mask_ar", "mask_input")
    for batch in self._bar(data, data.steps_per_epoch):
      result = self.decoder(params, {k: self._put(batch[k]) for k in keys},
                            seed=int(self.config["seed"]))
      index, valid = gather(self._put(batch["index"])), gather(self._put(batch["valid"]))
      tokens, logprobs = gather(result["tokens"]), gather(result["logprobs"])
      for row in np.flatnonzero(valid):
        out[int(index[row])] = (tokens[row], logprobs[row])
    preds = []
    for i in sorted(out):
      ex = self.source[i]
      tokens, logprobs = out[i]
      preds.append(dict(index=i, id=ex["id"], prompt=ex["prefix"],
                        prediction=self.tokenizer.decode(tokens),
                        references=list(ex.get("references") or []),
                        tokens=tokens, logprobs=logprobs))
    return preds

  def score(self, preds):
    """dict[str, float] from the predictions (and `self.source[pred["index"]]`)."""
    raise NotImplementedError

  def record(self, pred):
    """The jsonl record of one prediction (subclasses may add fields)."""
    return {k: pred[k] for k in ("id", "prompt", "prediction", "references")}

  def run(self, params, *, step=None):
    preds = self.predict(params)
    metrics = self.score(preds) if preds else {}
    metrics["num_examples"] = float(len(preds))
    if self.predictions_dir and jax.process_index() == 0:
      name = self.name if step is None else f"{self.name}-{int(step):06d}"
      predictions_lib.write(os.path.join(self.predictions_dir, f"{name}.jsonl"),
                            [self.record(p) for p in preds])
    return {k: float(v) for k, v in metrics.items()}
