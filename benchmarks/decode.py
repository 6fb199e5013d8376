"""Decode speed, ours (jit'd KV-cache loop) next to transformers' `generate`, same weights.

  python benchmarks/decode.py --preset cpu-small [--out results.jsonl] [--quick]

The preset's PaliGemma gets random weights from transformers (seed 0), saved with
`save_pretrained` into a temporary folder; our side imports them with
`paligemma.checkpoint.load`. Each side runs in its own process. For batch 1 and 16, after
the same image and `prompt_len`-token prompt:
  prefill_ms          image + prompt forward pass filling the KV cache;
  decode_tokens_per_s batch * new tokens / seconds of a whole greedy generation of
                      `decode_steps` new tokens (prefill included; eos ignored, so both
                      sides run the full length).
Times are medians after a warm-up call (our first call compiles). Our achieved FLOP/s
(matmuls of the whole generation, from its jaxpr) is given as a fraction of the
measured matmul peak. --quick generates 4 tokens and times one repetition (CI).
"""

import argparse
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=wrong-import-position
from paligemma import clean_exit  # pylint: disable=wrong-import-position

BATCH_SIZES = (1, 16)


def _inputs(preset, b):
  """Random image and prompt (bos + random pieces) of batch b, the same for both sides."""
  rng = np.random.default_rng(b)
  res = preset["model"]["img"]["image_size"]
  image = rng.uniform(-1, 1, (b, res, res, 3)).astype(np.float32)
  text = rng.integers(4, 256_000, (b, preset["prompt_len"])).astype(np.int32)
  text[:, 0] = 2  # bos
  return dict(image=image, text=text, mask_ar=np.zeros_like(text),
              mask_input=np.ones_like(text))


def make_weights(preset, directory):
  """Random transformers PaliGemma of the preset, saved with save_pretrained."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from paligemma.checkpoint import names  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  config = transformers.PaliGemmaConfig(**names.to_hf_config(preset["model"], preset["dtype"]))
  model = transformers.PaliGemmaForConditionalGeneration(config)
  model.to(getattr(torch, preset["dtype"])).save_pretrained(directory)


def ours(preset, weights):
  import jax  # pylint: disable=g-import-not-at-top
  from paligemma import checkpoint  # pylint: disable=g-import-not-at-top
  from paligemma import decode  # pylint: disable=g-import-not-at-top
  from paligemma.models import build  # pylint: disable=g-import-not-at-top

  # The layer layout `paligemma.predict` decodes with here (per layer on a CPU).
  scan = decode.stacked_layers()
  params, model_config = checkpoint.load(weights, dtype=preset["dtype"], stacked=scan)
  model = build.build_model(model_config, dtype=preset["dtype"], scan=scan)
  steps = preset["decode_steps"]
  decoder = decode.Decoder(model, max_decode_len=steps, eos_id=None)
  out = dict(device=str(jax.devices()[0].device_kind))
  flops_per_s = []
  for b in BATCH_SIZES:
    batch = {k: jax.device_put(v) for k, v in _inputs(preset, b).items()}
    generate = lambda p, x: decoder(p, x)["tokens"]
    # The decoder's own first step (its output layer as at this batch).
    prefill_s = common.timed(lambda: decoder.prefill(params, batch), preset["repeats"],
                             jax.block_until_ready)
    generate_s = common.timed(lambda: generate(params, batch), preset["repeats"],
                              jax.block_until_ready)
    flops = common.matmul_flops(generate, params, batch, while_trips=steps - 1)
    out[f"b{b}_prefill_ms"] = 1e3 * prefill_s
    out[f"b{b}_decode_tokens_per_s"] = b * steps / generate_s
    flops_per_s.append(flops / generate_s)
    out[f"b{b}_achieved_flops_per_s"] = flops / generate_s
  peak = common.matmul_peak_flops("jax", preset["dtype"], preset["repeats"])
  out["peak_matmul_flops_per_s"] = peak
  for b, f in zip(BATCH_SIZES, flops_per_s):
    out[f"b{b}_fraction_of_peak"] = f / peak
  return out


def theirs(preset, weights):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from paligemma.models import build  # pylint: disable=g-import-not-at-top

  dev = "cuda" if torch.cuda.is_available() else "cpu"
  model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(
      weights, dtype=getattr(torch, preset["dtype"])).to(dev).eval()
  n_img = build.build_model(preset["model"]).num_image_tokens
  image_token = model.config.image_token_index
  steps = preset["decode_steps"]
  sync = (lambda _: torch.cuda.synchronize()) if dev == "cuda" else (lambda _: None)
  out = dict(device=torch.cuda.get_device_name() if dev == "cuda" else "cpu")
  for b in BATCH_SIZES:
    x = _inputs(preset, b)
    ids = torch.tensor(np.concatenate([np.full((b, n_img), image_token), x["text"]], 1),
                       device=dev)
    pixels = torch.tensor(x["image"].transpose(0, 3, 1, 2), device=dev,
                          dtype=getattr(torch, preset["dtype"]))
    mask = torch.ones_like(ids)

    @torch.no_grad()
    def prefill():
      return model(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_cache=True)

    @torch.no_grad()
    def generate():
      return model.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask,
                            max_new_tokens=steps, min_new_tokens=steps, do_sample=False)

    out[f"b{b}_prefill_ms"] = 1e3 * common.timed(prefill, preset["repeats"], sync)
    out[f"b{b}_decode_tokens_per_s"] = b * steps / common.timed(generate, preset["repeats"],
                                                                  sync)
  out["peak_matmul_flops_per_s"] = common.matmul_peak_flops("torch", preset["dtype"],
                                                            preset["repeats"])
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="cpu-small", choices=sorted(common.PRESETS))
  parser.add_argument("--side", choices=("ours", "theirs", "weights"))
  parser.add_argument("--weights", help="folder of the transformers weights (with --side)")
  parser.add_argument("--quick", action="store_true", help="4 new tokens, one repetition (CI)")
  parser.add_argument("--out", help="append the results as one JSON line to this file")
  args = parser.parse_args()
  preset = common.preset_from_args(args.preset, args.quick)
  if args.side == "weights":
    make_weights(preset, args.weights)
    return
  if args.side:
    print(json.dumps((ours if args.side == "ours" else theirs)(preset, args.weights)))
    return
  with tempfile.TemporaryDirectory() as tmp:
    # The weights are made in a process of their own too (torch stays out of ours).
    extra = ["--weights", tmp] + (["--quick"] if args.quick else [])
    common.run_side(os.path.abspath(__file__), args.preset, "weights", extra)
    results, ratios = common.run_sides(os.path.abspath(__file__), args.preset, args.out, extra)
  print(f"  new tokens {preset['decode_steps']}, prompt {preset['prompt_len']} tokens; "
        + ", ".join(f"batch {b}: decode ours/theirs="
                    f"{ratios[f'b{b}_decode_tokens_per_s']:.2f}x, our matmuls at "
                    f"{results['ours'][f'b{b}_fraction_of_peak']:.1%} of peak"
                    for b in BATCH_SIZES))


if __name__ == "__main__":
  clean_exit.run(main)
