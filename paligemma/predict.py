r"""Run a PaliGemma checkpoint on images: one line per image.

  python -m paligemma.predict --checkpoint /tmp/shapes --image a.png b.png --prompt "caption en"
  python -m paligemma.predict --checkpoint kaggle:google/paligemma-2/jax/paligemma2-3b-pt-224 \
      --tokenizer paligemma_tokenizer.model --image cat.jpg --prompt "detect cat" --out boxes/

--checkpoint is a trainer workdir (params.npz + model_config.json + config.json, whose
`tokenizer` is used), a .npz file, a Hugging Face directory or a kaggle: handle.
--tokenizer defaults to the workdir's, else a `*tokenizer*.model` next to the
checkpoint, else the repo's tiny tokenizer when the model's vocabulary fits it.
For `detect ...` prompts each box is printed in pixels of the original image
(x_min, y_min, x_max, y_max) and, with --out, an annotated PNG is written there.
For `segment ...` prompts the `<seg>` tokens are decoded with the mask VQ-VAE (--vae:
big_vision's vae-oid.npz, or "shapes"; default the workdir's config's `vae`): boxes are
printed, --out draws the masks in colour with their boxes, and --json gives each mask
as COCO RLE ({"size": [H, W], "counts"}, pycocotools' string form).
--json prints one JSON object per image instead. --sampler takes a
`paligemma.decode` spec ("greedy", "nucleus(p=0.9)", "beam(4)", ...).
"""

import argparse
import glob
import json
import os
import sys

import numpy as np

from paligemma import checkpoint as checkpoint_lib
from paligemma import clean_exit
from paligemma import drawing
from paligemma import prompt as prompt_lib
from paligemma import tokenizer as tokenizer_lib

WORKDIR_FILES = ("params.npz", "model_config.json")


def is_workdir(path):
  return os.path.isdir(path) and all(os.path.exists(os.path.join(path, f))
                                     for f in WORKDIR_FILES)


def _read_json(path):
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}).") from None


def _find_tokenizer(path, run_config):
  """The tokenizer path for a checkpoint: the run's, or one stored beside the weights."""
  if run_config.get("tokenizer"):
    return run_config["tokenizer"]
  folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
  found = sorted(glob.glob(os.path.join(folder, "*tokenizer*.model")))
  return found[0] if found else None


def read_workdir(checkpoint, model_config=None):
  """(weights path, model_config, run_config, model extras) of a checkpoint.

  A trainer workdir gives its params.npz, its model_config.json overridden by the partial
  `model_config`, its config.json and the model dtype/scan it ran with; any other
  checkpoint passes through with `model_config` and empty dicts.
  """
  path, run_config, extra = os.fspath(checkpoint), {}, {}
  if is_workdir(path):
    if os.path.exists(os.path.join(path, "config.json")):
      run_config = _read_json(os.path.join(path, "config.json"))
    saved = _read_json(os.path.join(path, "model_config.json"))
    model_config = {k: {**saved.get(k, {}), **((model_config or {}).get(k) or {})}
                    for k in ("img", "llm")}
    model_run = run_config.get("model") or {}
    extra = {k: model_run[k] for k in ("dtype", "scan") if k in model_run}
    path = os.path.join(path, "params.npz")
  elif os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")) and \
      os.path.exists(os.path.join(path, "params.npz")):
    raise ValueError(f"{path} looks like a trainer workdir without model_config.json: the run "
                     "did not finish its export; use the workdir of a finished run.")
  return path, model_config, run_config, extra


def tokenizer_path(checkpoint, run_config, vocab, tokenizer=None):
  """`tokenizer`, else the run's, one beside the weights, or the tiny one if `vocab` is its."""
  tok_path = tokenizer or _find_tokenizer(os.fspath(checkpoint), run_config)
  if tok_path is None:
    # Only a model of exactly the tiny vocabulary can have been trained with it.
    if vocab != tokenizer_lib.load_tokenizer().vocab_size:
      raise ValueError(f"No tokenizer found for {checkpoint} (vocabulary {vocab}); pass "
                       "--tokenizer PATH, e.g. the checkpoint's paligemma_tokenizer.model.")
    tok_path = tokenizer_lib.TINY_TOKENIZER
  return tok_path


def adapter_dir(adapter):
  """A PEFT adapter directory, given as itself or as the workdir of a LoRA run."""
  if adapter is None:
    return None
  inside = os.path.join(os.fspath(adapter), "adapter")
  if os.path.exists(os.path.join(inside, "adapter_config.json")):
    return inside
  return os.fspath(adapter)


def load_for_inference(checkpoint, *, tokenizer=None, model_config=None, dtype=None,
                       adapter=None):
  """(model, params, tokenizer, run_config) from a workdir, .npz, HF dir or kaggle: handle.

  model_config: optional partial {"img", "llm"} overriding the file's (e.g. image_size);
  adapter: a PEFT LoRA adapter directory (or a LoRA run's workdir), merged into the
  weights as they load. The layers are stacked as the run had them (`Model.scan`), except
  on a CPU, where they are kept apart (`decode.stacked_layers`). run_config: the
  workdir's config.json as a dict ({} for other checkpoints).
  """
  from paligemma.models import build  # pylint: disable=g-import-not-at-top
  from paligemma import decode  # pylint: disable=g-import-not-at-top
  path, model_config, run_config, extra = read_workdir(checkpoint, model_config)
  # The run's layer layout, or per layer where decoding reads that faster (a CPU).
  extra["scan"] = extra.get("scan", True) and decode.stacked_layers()
  params, model_config = checkpoint_lib.load(path, config=model_config, dtype=dtype,
                                             adapter=adapter_dir(adapter),
                                             stacked=extra["scan"])
  if dtype is not None:
    extra["dtype"] = dtype
  model = build.build_model(model_config, **extra)
  vocab = model_config["llm"]["vocab_size"]
  tok_path = tokenizer_path(checkpoint, run_config, vocab, tokenizer)
  tok = tokenizer_lib.load_tokenizer(tok_path)
  if tok.vocab_size > vocab:
    raise ValueError(f"Tokenizer {tok_path} has {tok.vocab_size} pieces but the model "
                     f"{checkpoint} only {vocab}; pass the tokenizer it was trained with.")
  return model, params, tok, run_config


def run_vae(run_config):
  """The mask VAE path a workdir's run used (its data's or an evaluator's `vae`), or None."""
  data = (run_config.get("input") or {}).get("data")
  evals = list((run_config.get("evals") or {}).values())
  for cfg in [data] + evals + [e.get("data") for e in evals if isinstance(e, dict)]:
    if isinstance(cfg, dict) and cfg.get("vae"):
      return cfg["vae"]
  return None


def _xyxy(box, height, width):
  """Pixel [x_min, y_min, x_max, y_max] (0.1 px) of a box (y1, x1, y2, x2) in [0, 1]."""
  from paligemma.evaluators import detection  # pylint: disable=g-import-not-at-top
  return [round(float(v), 1) for v in detection.to_pixels(box, height, width)[[1, 0, 3, 2]]]


def _rle(mask):
  """COCO RLE {"size": [H, W], "counts": str} of a bool[H, W] mask."""
  from pycocotools import mask as mask_utils  # pylint: disable=g-import-not-at-top
  rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def predict(model, params, tok, images, prompt, *, max_decode_len=32, sampler="greedy",
            seed=0, batch_size=8, vae=None):
  """list[dict] per image: image, prompt, prediction (str); for detect prompts `boxes`
  (pixel x/y min/max), `malformed` and `objects` (parsed, boxes in [0, 1]: what
  `drawing.draw_objects` takes); segment prompts (`vae`: a loaded `segmentation.VAE`)
  add each object's `mask`, as COCO RLE in `boxes` and bool[H, W] in `objects`.

  An unreadable image gets an `error` instead of a prediction.
  """
  from paligemma import decode  # pylint: disable=g-import-not-at-top
  from paligemma.data import pipeline, sources  # pylint: disable=g-import-not-at-top
  from paligemma.evaluators import detection  # pylint: disable=g-import-not-at-top
  examples = [dict(image=os.path.abspath(p), prefix=prompt, suffix=None, id=str(i),
                   references=[]) for i, p in enumerate(images)]
  source = sources.ListSource("predict", examples)
  text_len = len(prompt_lib.assemble(tok, prompt, text_len=None, mode="eval")[0]["text"])
  image_size = model.img.image_size
  data = pipeline.make_eval_input(source, tok, image_size=image_size, text_len=text_len,
                                  batch_size=min(batch_size, len(examples)),
                                  process_index=0, process_count=1)
  decoder = decode.Decoder(model, max_decode_len=max_decode_len, sampler=sampler)
  results = {}
  for batch in data:
    out = decoder(params, batch, seed=seed)
    for row, text in enumerate(decoder.texts(tok, out)):
      if batch["valid"][row]:
        results[int(batch["index"][row])] = text
  outputs = []
  for i, path in enumerate(images):
    rec = {"image": path, "prompt": prompt}
    if i not in results:
      rec["error"] = data.stats.skipped.get(str(i), "unreadable image")
      outputs.append(rec)
      continue
    rec["prediction"] = results[i]
    if prompt.startswith("detect"):
      h, w = detection.image_hw(examples[i]["image"])
      objects, malformed = tokenizer_lib.parse_detections(results[i])
      rec["boxes"] = [{"label": label, "box_xyxy": _xyxy(box, h, w)} for label, box in objects]
      rec["objects"] = drawing.detection_objects(objects)
      rec["malformed"] = malformed
    elif prompt.startswith("segment"):
      if vae is None:
        raise ValueError("A segment prompt needs the mask VAE: pass --vae (big_vision's "
                         "vae-oid.npz, or \"shapes\" for the shapes demo).")
      from paligemma import segmentation  # pylint: disable=g-import-not-at-top
      h, w = detection.image_hw(examples[i]["image"])
      objects, malformed = segmentation.parse_segmentation(results[i], vae, h, w)
      rec["boxes"] = [{"label": o["label"], "box_xyxy": _xyxy(o["box"], h, w),
                       "mask": _rle(o["mask"])} for o in objects]
      rec["objects"] = objects
      rec["malformed"] = malformed
    outputs.append(rec)
  return outputs


def draw(image_path, objects, out_path):
  """Writes a PNG of the image with the parsed objects drawn (`drawing.draw_objects`)."""
  from paligemma.data import images as images_lib  # pylint: disable=g-import-not-at-top
  drawing.draw_objects(images_lib.decode(image_path), objects).save(out_path)


def _parser():
  p = argparse.ArgumentParser(prog="python -m paligemma.predict", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True,
                 help="trainer workdir, .npz, Hugging Face directory or kaggle: handle")
  p.add_argument("--tokenizer", help="SentencePiece .model (default: see above)")
  p.add_argument("--image", nargs="+", required=True, help="image file(s)")
  p.add_argument("--prompt", default="caption en", help='e.g. "caption en", "detect cat"')
  p.add_argument("--out", help="folder for annotated PNGs of detect and segment prompts")
  p.add_argument("--vae", help='segment prompts: the mask VQ-VAE (vae-oid.npz, or "shapes"); '
                 "default: the workdir config's")
  p.add_argument("--json", action="store_true", help="one JSON object per image")
  p.add_argument("--sampler", default="greedy", help="decode spec, e.g. nucleus(p=0.9)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--max_decode_len", type=int, default=32)
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--dtype", help="cast params, e.g. bfloat16 (default: as stored)")
  p.add_argument("--adapter", help="a PEFT LoRA adapter directory (or a LoRA run's workdir) "
                 "to apply to --checkpoint, its base")
  return p


def main(argv=None):
  args = _parser().parse_args(argv)
  missing = [p for p in args.image if not os.path.exists(p)]
  if missing:
    sys.exit(f"Image file(s) not found: {', '.join(missing)}")
  model, params, tok, run_config = load_for_inference(args.checkpoint, tokenizer=args.tokenizer,
                                                      dtype=args.dtype, adapter=args.adapter)
  vae = None
  if args.prompt.startswith("segment"):
    vae_path = args.vae or run_vae(run_config)
    if not vae_path:
      sys.exit("A segment prompt needs the mask VQ-VAE: pass --vae vae-oid.npz (from "
               "storage.googleapis.com/big_vision/paligemma/vae-oid.npz).")
    from paligemma import segmentation  # pylint: disable=g-import-not-at-top
    vae = segmentation.load_vae(vae_path)
  outputs = predict(model, params, tok, args.image, args.prompt,
                    max_decode_len=args.max_decode_len, sampler=args.sampler, seed=args.seed,
                    batch_size=args.batch_size, vae=vae)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
  for rec in outputs:
    objects = rec.pop("objects", None)
    if args.out and objects is not None:
      stem = os.path.splitext(os.path.basename(rec["image"]))[0]
      rec["annotated"] = os.path.join(args.out, f"{stem}.png")
      draw(rec["image"], objects, rec["annotated"])
    if args.json:
      print(json.dumps(rec, ensure_ascii=False))
    elif "error" in rec:
      print(f"{rec['image']}\tERROR: {rec['error']}")
    else:
      # One line per image, whatever the model wrote.
      text = rec["prediction"].replace("\\", "\\\\").replace("\n", "\\n")
      print(f"{rec['image']}\t{text}")
      for b in rec.get("boxes", []):
        print(f"  {b['label']}: {', '.join(f'{v:g}' for v in b['box_xyxy'])}")
  return outputs


if __name__ == "__main__":
  clean_exit.run(main)
