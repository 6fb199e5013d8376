"""Training speed, ours (Flax) next to transformers (PyTorch): forward + backward + Adam.

  python benchmarks/train_step.py --preset cpu-small [--out results.jsonl] [--quick]

Both sides train every parameter of the same PaliGemma config on the same batch (half
prefix, half suffix; loss on the suffix), with Adam. Prints examples/s for each side, the
ratio ours/theirs, and each side's achieved FLOP/s as a fraction of the machine's
measured matmul peak. The FLOP count is that of our step's matmuls (from its jaxpr, layers
counted once each) and is used for both sides; transformers also computes logits at the
image positions, work the loss does not need, which is not counted. --quick times one
step after the warm-up (CI); the figures are noisier.
"""

import functools
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=wrong-import-position
from paligemma import clean_exit  # pylint: disable=wrong-import-position


def _batch(preset):
  """Random training batch: half prefix, half suffix, in big_vision's layout."""
  rng = np.random.default_rng(0)
  b, t, res = preset["batch"], preset["text_len"], preset["model"]["img"]["image_size"]
  text = rng.integers(4, preset["model"]["llm"]["vocab_size"], (b, t + 1)).astype(np.int32)
  mask_ar = np.zeros_like(text)
  mask_ar[:, t // 2:] = 1
  image = rng.uniform(-1, 1, (b, res, res, 3)).astype(np.float32)
  return dict(image=image, text=text, mask_ar=mask_ar, mask_loss=mask_ar.copy())


def ours(preset):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from paligemma.checkpoint import tree  # pylint: disable=g-import-not-at-top
  from paligemma.models import build  # pylint: disable=g-import-not-at-top
  from paligemma.trainer import step as step_lib  # pylint: disable=g-import-not-at-top

  model = build.build_model(preset["model"], dtype=preset["dtype"])
  batch = {k: jnp.asarray(v) for k, v in _batch(preset).items()}
  shapes = build.abstract_params(model)
  key = iter(jax.random.split(jax.random.PRNGKey(0), 10_000))
  params = jax.tree.map(lambda s: 0.02 * jax.random.normal(next(key), s.shape, s.dtype), shapes)
  trainable = tree.flatten(params)
  tx = optax.adam(1e-5, b2=0.999)
  opt_state = tx.init(trainable)
  # The output layer on the batch's loss tokens, as the trainer runs it.
  step_fn = functools.partial(step_lib.make_train_step(model, tx, lambda s: 1e-5),
                              loss_len=step_lib.loss_length(batch["mask_loss"]))
  flops = common.matmul_flops(step_fn, trainable, {}, opt_state, batch, 0)
  step = jax.jit(step_fn, donate_argnums=(0, 2))
  state = {"t": trainable, "o": opt_state}
  count = jnp.int32(0)

  def one():
    state["t"], state["o"], m = step(state["t"], {}, state["o"], batch, count)
    return m["loss"]
  sec = common.timed(one, preset["steps"], jax.block_until_ready)
  peak = common.matmul_peak_flops("jax", preset["dtype"], preset["repeats"])
  return dict(device=str(jax.devices()[0].device_kind), examples_per_s=preset["batch"] / sec,
              step_ms=1e3 * sec, flops_per_step=float(flops),
              achieved_flops_per_s=flops / sec, peak_matmul_flops_per_s=peak,
              fraction_of_peak=flops / sec / peak)


def torch_steps(preset, wrap=lambda model: model, lr=1e-5):
  """(median seconds of an Adam step of transformers' PaliGemma on the preset's batch,
  the trained parameters); `wrap` turns the model into the one trained (e.g. PEFT's)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from paligemma.checkpoint import names  # pylint: disable=g-import-not-at-top
  from paligemma.models import build  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  dtype = getattr(torch, preset["dtype"])
  hf_config = transformers.PaliGemmaConfig(**names.to_hf_config(preset["model"], preset["dtype"]))
  model = wrap(transformers.PaliGemmaForConditionalGeneration(hf_config).to(dev, dtype)).train()
  n = build.build_model(preset["model"]).num_image_tokens
  batch = _batch(preset)
  b = preset["batch"]
  ids = np.concatenate([np.full((b, n), hf_config.image_token_index), batch["text"][:, :-1]], 1)
  token_type = np.concatenate([np.zeros((b, n)), batch["mask_ar"][:, :-1]], 1)
  labels = np.where(token_type == 1, ids, -100)
  inputs = dict(input_ids=torch.tensor(ids, device=dev),
                pixel_values=torch.tensor(batch["image"].transpose(0, 3, 1, 2), device=dev,
                                          dtype=dtype),
                token_type_ids=torch.tensor(token_type, device=dev).long(),
                labels=torch.tensor(labels, device=dev))
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))

  def one():
    loss = model(**inputs).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss
  sync = (lambda _: torch.cuda.synchronize()) if dev == "cuda" else (lambda _: None)
  return common.timed(one, preset["steps"], sync), params


def theirs(preset):
  import torch  # pylint: disable=g-import-not-at-top
  sec, _ = torch_steps(preset)
  peak = common.matmul_peak_flops("torch", preset["dtype"], preset["repeats"])
  dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
  return dict(device=dev, examples_per_s=preset["batch"] / sec, step_ms=1e3 * sec,
              peak_matmul_flops_per_s=peak)


def main():
  ran = common.cli(__doc__, __file__, ours, theirs)
  if ran is None:
    return
  _, results = ran
  flops = results["ours"]["flops_per_step"]
  theirs_sec = results["theirs"]["step_ms"] / 1e3
  print(f"  peak: of their own matmul peak, theirs reach "
        f"{flops / theirs_sec / results['theirs']['peak_matmul_flops_per_s']:.1%}, ours "
        f"{results['ours']['fraction_of_peak']:.1%} ({flops / 1e9:.1f} GFLOP a step)")


if __name__ == "__main__":
  clean_exit.run(main)
