r"""Convert a PaliGemma checkpoint between .npz (big_vision / Kaggle) and Hugging Face.

  python -m paligemma.convert SRC DST [--to npz|hf] [--dtype float32|bfloat16|float16]
      [--tokenizer SPM] [--adapter DIR --merge]

SRC: a trainer workdir (params.npz + model_config.json + config.json), a .npz file, a
Hugging Face directory (config.json + *.safetensors) or a
`kaggle:<owner>/<model>/jax/<variation>` handle. DST: a .npz path or a directory; --to
defaults to npz when DST ends in .npz, else hf. --to hf also writes the processor files
(AutoProcessor loads them), from --tokenizer, else the workdir's tokenizer, else a
`*tokenizer*.model` beside SRC, else the repo's tiny one when the vocabulary is its size;
with none it refuses. --adapter DIR --merge merges a Hugging Face PEFT LoRA adapter
(a LoRA run's workdir/adapter, save_peft's, or one trained in PEFT) for the base SRC into
the weights written (W + lora_alpha / r * B A, in float32, then --dtype). Prints one
summary line at the end.
"""

import argparse
import json
import os
import sys

import numpy as np

from paligemma import checkpoint
from paligemma import clean_exit
from paligemma import predict
from paligemma.checkpoint import kaggle


def _variant(model_config):
  img, llm = model_config["img"], model_config["llm"]
  vit = img["variant"] or f"ViT(width={img['width']}, depth={img['depth']})"
  gemma = llm["variant"] or f"Gemma(width={llm['width']}, depth={llm['depth']})"
  return f"{vit} + {gemma} at {img['image_size']}px, vocab {llm['vocab_size']:,}"


def summary(params, model_config, dst, to, nbytes, tokenizer=None, adapter=None):
  """One line: what was written, how many parameters and bytes, which variant."""
  leaves = list(checkpoint.tree.flatten(params).values())
  count = sum(int(np.prod(x.shape)) for x in leaves)
  dtypes = sorted({str(x.dtype) for x in leaves})
  processor = f"; processor from {tokenizer}" if tokenizer else ""
  merged = f"; adapter {adapter} merged" if adapter else ""
  return (f"wrote {dst} ({to}): {count:,} parameters, {nbytes:,} bytes "
          f"({nbytes / 2**30:.2f} GiB, {'/'.join(dtypes)}), {_variant(model_config)}"
          f"{merged}{processor}")


def _local(src):
  """SRC as a local path: a kaggle: handle is fetched (or found in the cache) once, here."""
  if src.startswith(kaggle.PREFIX):
    return kaggle.pick_checkpoint(kaggle.resolve(src), src)
  return src


def resolve(src, to, tokenizer=None):
  """(weights path, partial model_config, tokenizer path or None) of SRC, before loading.

  The tokenizer (--to hf only) is found as predict finds it, so a missing one is refused
  before any weight is read.
  """
  local = _local(src)
  adapter = os.path.join(local, "adapter", "adapter_config.json")
  if os.path.exists(adapter) and not predict.is_workdir(local):
    with open(adapter) as f:
      base = json.load(f).get("base_model_name_or_path") or "BASE"
    raise ValueError(f"{src} is a LoRA run's workdir (its adapters in adapter/, no "
                     f"params.npz): convert its base with the adapter merged, `python -m "
                     f"paligemma.convert {base} DST --adapter {os.path.dirname(adapter)} "
                     "--merge`")
  path, model_config, run_config, _ = predict.read_workdir(local)
  if to != "hf":
    return path, model_config, None
  file_config = checkpoint.merge_config(checkpoint.describe(path).config, model_config)
  vocab = file_config["llm"]["vocab_size"]
  return path, model_config, predict.tokenizer_path(local, run_config, vocab, tokenizer)


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m paligemma.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("src", help="trainer workdir, .npz file, Hugging Face directory or "
                      "kaggle: handle")
  parser.add_argument("dst", help=".npz path or output directory")
  parser.add_argument("--to", choices=("npz", "hf"), help="output format (default: from DST)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                      help="cast every parameter (default: keep the source's)")
  parser.add_argument("--tokenizer", help="SentencePiece model for the HF processor files "
                      "(--to hf only; default: see above)")
  parser.add_argument("--adapter", metavar="DIR", help="a PEFT LoRA adapter directory for "
                      "the base SRC, merged into the output (with --merge)")
  parser.add_argument("--merge", action="store_true", help="merge --adapter into the "
                      "weights: W + lora_alpha / r * B A")
  args = parser.parse_args(argv)
  to = args.to or ("npz" if args.dst.endswith(".npz") else "hf")
  if to == "hf" and os.path.isfile(args.dst):
    parser.error(f"{args.dst} is a file; --to hf writes a directory")
  if args.tokenizer and to != "hf":
    parser.error("--tokenizer only applies to --to hf")
  if args.adapter and not args.merge:
    parser.error("--adapter needs --merge: .npz and Hugging Face checkpoints hold plain "
                 "weights, so the adapter is merged into them (W + lora_alpha / r * B A)")
  if args.merge and not args.adapter:
    parser.error("--merge needs --adapter DIR, the PEFT adapter to merge into SRC")
  try:
    path, config, tokenizer = resolve(args.src, to, args.tokenizer)
    params, model_config = checkpoint.load(path, config=config, dtype=args.dtype,
                                           progress=True, adapter=args.adapter)
    if to == "npz":
      nbytes = checkpoint.save_npz(params, args.dst, progress=True)
    else:
      nbytes = checkpoint.save_hf(params, model_config, args.dst, tokenizer=tokenizer,
                                  progress=True)
  except (checkpoint.CheckpointError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(summary(params, model_config, args.dst, to, nbytes, tokenizer, args.adapter))
  return 0


if __name__ == "__main__":
  clean_exit.run(main)
