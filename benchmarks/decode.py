"""Decode speed: our jit'd KV-cache loop vs transformers' `generate`, same weights.

  python benchmarks/decode.py [--new_tokens 32] [--batch_sizes 1 16] [--width 256]

A small random PaliGemma 2 (SigLIP 32 px / patch 8, Gemma 2 of `--width` and 4 layers,
the real 257k vocabulary) is saved with transformers' `save_pretrained` and imported
with `paligemma.checkpoint.load`. Both decode `--new_tokens` tokens greedily (eos
ignored, so both run the full length) after the same 8-token prompt; the time is the
median of `--repeats` runs after a warm-up (our first call compiles). Prints generated
tokens/s (batch * new tokens / seconds) for each, and the ratio.
"""

import argparse
import os
import statistics
import tempfile
import time

import jax
import numpy as np
import torch
import transformers

from paligemma import checkpoint
from paligemma import decode
from paligemma.models.paligemma import Model

VOCAB, IMAGE_TOKEN = 257_216, 257_152


def make_hf(directory, width):
  vision = dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=2, patch_size=8, image_size=32,
                vision_use_head=False)
  text = dict(model_type="gemma2", hidden_size=width, intermediate_size=4 * width,
              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              head_dim=width // 4, query_pre_attn_scalar=width // 4, vocab_size=VOCAB,
              sliding_window=4096, hidden_activation="gelu_pytorch_tanh")
  config = transformers.PaliGemmaConfig(vision_config=vision, text_config=text,
                                        image_token_index=IMAGE_TOKEN, projection_dim=width,
                                        hidden_size=width, vocab_size=VOCAB)
  torch.manual_seed(0)
  model = transformers.PaliGemmaForConditionalGeneration(config).float().eval()
  model.save_pretrained(directory)
  return model


def _median_time(fn, repeats):
  fn()  # Warm-up (and compilation for ours).
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--new_tokens", type=int, default=32)
  p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 16])
  p.add_argument("--width", type=int, default=256)
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  torch.set_num_threads(os.cpu_count())

  with tempfile.TemporaryDirectory() as tmp:
    hf = make_hf(tmp, args.width)
    params, model_config = checkpoint.load(tmp)
  model = Model(**model_config)
  n_img = model.num_image_tokens
  decoder = decode.Decoder(model, max_decode_len=args.new_tokens, eos_id=None)
  print(f"PaliGemma 2 tiny: width {args.width}, 4 layers, vocab {VOCAB}, {n_img} image "
        f"tokens + 8 prompt tokens, {args.new_tokens} new tokens, greedy; "
        f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__}")
  print(f"{'batch':>5} {'ours tok/s':>11} {'transformers tok/s':>19} {'ratio':>6}")
  rng = np.random.default_rng(0)
  for b in args.batch_sizes:
    image = rng.uniform(-1, 1, (b, 32, 32, 3)).astype(np.float32)
    text = rng.integers(4, 257_000, (b, 8)).astype(np.int32)
    text[:, 0] = 2  # bos
    batch = dict(image=image, text=text, mask_ar=np.zeros_like(text),
                 mask_input=np.ones_like(text))
    ours = _median_time(lambda: jax.block_until_ready(decoder(params, batch)["tokens"]),
                        args.repeats)

    ids = torch.tensor(np.concatenate([np.full((b, n_img), IMAGE_TOKEN), text], 1))
    pixels = torch.tensor(image.transpose(0, 3, 1, 2))

    def generate():
      with torch.no_grad():
        return hf.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                           max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                           do_sample=False)

    theirs = _median_time(generate, args.repeats)
    ours_tps, theirs_tps = b * args.new_tokens / ours, b * args.new_tokens / theirs
    print(f"{b:>5} {ours_tps:>11.1f} {theirs_tps:>19.1f} {ours_tps / theirs_tps:>6.2f}")


if __name__ == "__main__":
  main()
