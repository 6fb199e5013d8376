"""Evaluators: metrics of a model on a data source, built once from a config, run often.

The contract (shared by the trainer, `python -m paligemma.evaluate` and tests): a
transfer config has `config.evals`, a dict name -> ConfigDict with

  type            registry name (below)
  every           steps between runs (read by the trainer, ignored here)
  data            a data source config for `paligemma.data.make_source`
  batch_size      examples per batch (global)
  prompt          optional: replaces each example's prefix; `{field}` is filled from the
                  example (e.g. "answer en {question}"); default: the source's prefix
  max_decode_len  decoding evaluators: tokens to generate at most (default 32)
  sampler         decoding evaluators: `paligemma.decode` spec, default "greedy"
  seed            decoding evaluators: sampling seed (default 0)
  num_examples    optional: evaluate only the first N examples of the source
  ...             evaluator-specific keys, documented in its module

Unknown keys raise, naming the key and the valid ones. Usage:

  ev = make_evaluator(cfg.type, cfg, model=model, tokenizer=tok, image_size=224,
                      text_len=64, predictions_dir=None, eval_name="caption")
  metrics = ev.run(params)   # {"cider": 1.1, "bleu4": 0.3, ...}; logged as {name}/{metric}

Context arguments of `make_evaluator` (the run's, not the evaluator's):
  model            paligemma.models.paligemma.Model
  tokenizer        paligemma.tokenizer.Tokenizer
  image_size       int, the model's input resolution
  text_len         int, prompt length (tokens) for decoding, prompt + suffix for perplexity
  predictions_dir  optional folder: decoding evaluators write `{eval_name}.jsonl` there (or
                   `{eval_name}-{step:06d}.jsonl` when `run(params, step=...)`)
  eval_name        the evaluator's name in config.evals (default: its type)
  data_sharding    optional jax.sharding.Sharding for batch arrays (batch axis first);
                   needed with several processes, where each feeds its own rows
  progress         show a tqdm bar (default True)
  antialias        resize with antialiasing (default True), the run's input.antialias

Metrics are floats; fractions in [0, 1] (accuracies, mAP, IoU), pycocoevalcap's scale
for CIDEr etc. Registry: perplexity, caption, exact_match, vqa, detection, segmentation.
"""

import importlib

# type -> "module:Class" in this package.
REGISTRY = {
    "perplexity": "perplexity:PerplexityEvaluator",
    "caption": "captioning:CaptionEvaluator",
    "exact_match": "exact_match:ExactMatchEvaluator",
    "vqa": "vqa:VqaEvaluator",
    "detection": "detection:DetectionEvaluator",
    "segmentation": "segmentation:SegmentationEvaluator",
}


def make_evaluator(name, config, *, model, tokenizer, image_size, text_len, **context):
  """An evaluator of registry type `name` from its config (see the module docstring)."""
  if name not in REGISTRY:
    raise ValueError(f"Unknown evaluator type {name!r} in config.evals; valid types: "
                     f"{', '.join(REGISTRY)}.")
  module, cls = REGISTRY[name].split(":")
  evaluator_cls = getattr(importlib.import_module(f"paligemma.evaluators.{module}"), cls)
  return evaluator_cls(config, model=model, tokenizer=tokenizer, image_size=image_size,
                       text_len=text_len, **context)
