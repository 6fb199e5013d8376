r"""Run a transfer config's evaluators on a checkpoint: metrics.json and predictions.

  python -m paligemma.evaluate --config transfers/shapes.py --checkpoint /tmp/shapes
  python -m paligemma.evaluate --config transfers/cococap.py --checkpoint ft.npz \
      --out /tmp/cococap_eval --config.evals.caption.batch_size=8

Runs every entry of `config.evals` (see paligemma/evaluators) on its data, with a
progress bar, and writes `{out}/metrics.json` ({"{eval name}/{metric}": value}) and
`{out}/{eval name}.jsonl` predictions. --out defaults to `{workdir}/eval` for a
trainer workdir. --eval NAME (repeatable) runs only those evaluators. --adapter DIR
applies a PEFT LoRA adapter (or the one a LoRA run wrote in its workdir, whose eval/
then holds the outputs) to the checkpoint, merged as it loads:

  python -m paligemma.evaluate --config transfers/shapes_lora.py --checkpoint /tmp/shapes \
      --adapter /tmp/shapes_lora

The model: a workdir's own model_config.json; for other checkpoints the config's
`model.img` / `model.llm` fields over the file's (so image_size resamples as in
training). The tokenizer: --tokenizer, else the config's `tokenizer`, else as
`paligemma.predict` finds it.
"""

import os

from absl import app
from absl import flags
import tensorflow as tf

from paligemma import config as config_lib
from paligemma import json_files

_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "Trainer workdir, .npz, Hugging Face dir or kaggle: handle.")
_OUT = flags.DEFINE_string("out", None, "Output folder (default: {workdir}/eval).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "SentencePiece .model override.")
_EVAL = flags.DEFINE_multi_string("eval", None, "Run only these evaluators (names).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars.")
_ADAPTER = flags.DEFINE_string("adapter", None, "A PEFT LoRA adapter directory (or a LoRA "
                               "run's workdir) applied to --checkpoint, its base.")


def evaluate(config, checkpoint, out, *, tokenizer=None, only=None, progress=True,
             adapter=None):
  """dict of "{eval name}/{metric}" -> float; writes metrics.json and predictions in `out`.
  adapter: a PEFT LoRA adapter directory (or LoRA workdir) applied to `checkpoint`."""
  from paligemma import predict  # pylint: disable=g-import-not-at-top
  from paligemma.evaluators import make_evaluator  # pylint: disable=g-import-not-at-top
  evals = dict(config.get("evals") or {})
  if not evals:
    raise ValueError("The config has no `evals`: nothing to evaluate. Add evaluators to "
                     "config.evals (see paligemma/evaluators/__init__.py).")
  unknown = sorted(set(only or ()) - set(evals))
  if unknown:
    raise ValueError(f"--eval {unknown} not in config.evals; valid: {sorted(evals)}.")
  model_cfg = config.get("model") or {}
  overrides = {k: dict(model_cfg[k]) for k in ("img", "llm") if k in model_cfg}
  model, params, tok, _ = predict.load_for_inference(
      checkpoint, tokenizer=tokenizer or config.get("tokenizer"),
      model_config=None if predict.is_workdir(checkpoint) else overrides, adapter=adapter)
  image_size = config.input.image_size if "input" in config else model.img.image_size
  text_len = config.input.text_len if "input" in config else 64
  antialias = config.input.get("antialias", True) if "input" in config else True
  tf.io.gfile.makedirs(out)
  metrics = {}
  for name, cfg in evals.items():
    if only and name not in only:
      continue
    ev = make_evaluator(cfg.type, cfg, model=model, tokenizer=tok, image_size=image_size,
                        text_len=text_len, antialias=antialias, predictions_dir=out,
                        eval_name=name, progress=progress)
    for k, v in ev.run(params).items():
      metrics[f"{name}/{k}"] = float(v)
  json_files.write_json(os.path.join(out, "metrics.json"), metrics)
  return metrics


def main(argv, config):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if config is None or _CHECKPOINT.value is None:
    raise app.UsageError("--config and --checkpoint are required.")
  from paligemma import predict  # pylint: disable=g-import-not-at-top
  out = _OUT.value
  if out is None:
    adapter_run = _ADAPTER.value and predict.adapter_dir(_ADAPTER.value) != _ADAPTER.value
    if not (adapter_run or predict.is_workdir(_CHECKPOINT.value)):
      raise app.UsageError("--out is required unless --checkpoint (or --adapter) is a "
                           "trainer workdir.")
    out = os.path.join(_ADAPTER.value if adapter_run else _CHECKPOINT.value, "eval")
  config_lib.validate(config)
  metrics = evaluate(config, _CHECKPOINT.value, out, tokenizer=_TOKENIZER.value,
                     only=_EVAL.value, progress=_PROGRESS.value, adapter=_ADAPTER.value)
  for k, v in sorted(metrics.items()):
    print(f"{k}\t{v:.6g}")
  print(f"Wrote {os.path.join(out, 'metrics.json')}")


if __name__ == "__main__":
  config_lib.run(main)
