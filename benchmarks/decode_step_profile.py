"""Where one greedy decode step goes: the parts of a step timed alone, next to the whole.

  python benchmarks/decode_step_profile.py [--preset cpu-small] [--batch 16]

For the preset's model with random weights, after a prefill of `prompt_len` tokens:
  step              the decoder's greedy step: Model.extend (all layers, one token) + the
                    output layer + the greedy pick and its log-probability;
  layers            Model.extend alone (features float[B, D]);
  output_layer      features -> float32 logits, as greedy decoding makes them at this
                    batch: [V, B] (vocabulary-first) from 2 rows up on a CPU, else [B, V];
  pick              the greedy token and its log-probability from those logits
                    (sampling.pick_vocab_first, or sampling.argmax + sampling.token_logprob);
  embedding_read    the bandwidth floor: one pass over the embedding (a sum).
Each is jitted and timed as the median of `steps` calls after a warm-up. The embedding
is [V, D] float32 = V * D * 4 bytes, read once a step: at batch 1 that read, not the
arithmetic, bounds the step on a CPU.
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=wrong-import-position
from paligemma import clean_exit  # pylint: disable=wrong-import-position

from paligemma import decode  # pylint: disable=wrong-import-position
from paligemma import sampling  # pylint: disable=wrong-import-position
from paligemma.models import build  # pylint: disable=wrong-import-position
from paligemma.models.paligemma import Model  # pylint: disable=wrong-import-position


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="cpu-small", choices=sorted(common.PRESETS))
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--steps", type=int, default=20)
  args = parser.parse_args()
  preset = common.PRESETS[args.preset]
  model = build.build_model(preset["model"], dtype=preset["dtype"])
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32) * 0.02, s.dtype),
      build.abstract_params(model))
  b, t = args.batch, preset["prompt_len"]
  res = model.img.image_size
  image = jnp.zeros((b, res, res, 3), jnp.float32)
  text = jnp.asarray(rng.integers(3, 1000, (b, t)), jnp.int32)
  zeros = jnp.zeros((b, t), jnp.int32)
  apply = lambda *a, method: model.apply({"params": params}, *a, method=method)
  _, cache = jax.jit(lambda: apply(image, text, zeros, jnp.ones_like(zeros),
                                   model.img.num_tokens + t + 2, method=Model.prefill))()
  tokens = jnp.asarray(rng.integers(3, 1000, (b,)), jnp.int32)
  vocab_first = decode.vocab_first(b, None)
  emb = params["llm"]["embedder"]["input_embedding"]

  layers = jax.jit(lambda tok, c: apply(tok, c, method=Model.extend)[0])
  features = layers(tokens, cache)
  output = jax.jit(lambda x: decode._logits(model, params, x, vocab_first))  # pylint: disable=protected-access
  logits = output(features)
  pick = jax.jit(sampling.pick_vocab_first if vocab_first else (
      lambda z: (lambda tok: (tok, sampling.token_logprob(z, tok)))(sampling.argmax(z))))
  step = jax.jit(lambda tok, c: pick(output(layers(tok, c))))
  read = jax.jit(lambda e: jnp.sum(e, axis=0))
  sync = jax.block_until_ready
  parts = dict(step=lambda: step(tokens, cache), layers=lambda: layers(tokens, cache),
               output_layer=lambda: output(features), pick=lambda: pick(logits),
               embedding_read=lambda: read(emb))
  times = {k: 1e3 * common.timed(fn, args.steps, sync) for k, fn in parts.items()}
  mb = emb.size * emb.dtype.itemsize / 2**20
  print(f"{args.preset}, batch {b}, embedding {tuple(emb.shape)} {emb.dtype} ({mb:.0f} MiB), "
        f"logits {'[V, B]' if vocab_first else '[B, V]'}:")
  for k, ms in times.items():
    share = f" ({100 * ms / times['step']:.0f}% of a step)" if k != "step" else ""
    print(f"  {k:15s} {ms:7.2f} ms{share}")
  print(f"  embedding read at {mb / 1024 / times['embedding_read'] * 1e3:.1f} GiB/s")


if __name__ == "__main__":
  clean_exit.run(main)
