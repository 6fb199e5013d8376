"""LoRA training speed, ours (Flax) next to PEFT on transformers (PyTorch), and the base's memory.

  python benchmarks/lora_train_step.py --preset cpu-small [--out results.jsonl] [--quick]

Both sides put rank-8 adapters (alpha 8) on the modules of PEFT's PaliGemma recipe (LLM
q/k/v/o and gate/up/down, which also match SigLIP's q/k/v: our targets "peft") of the
same random model, freeze the rest, and train the adapters with Adam on the same batch
(half prefix, half suffix; loss on the suffix). Prints examples/s of each side and the
ratio; then the bytes of the frozen base of this preset and of PaliGemma 2 3B stored in
float16 against NF4 and int8 (QLoRA), from the shapes alone.
"""

import functools
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=wrong-import-position
from paligemma import clean_exit  # pylint: disable=wrong-import-position
import train_step  # pylint: disable=wrong-import-position

RANK = 8
PEFT_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def ours(preset):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from paligemma import lora as lora_lib  # pylint: disable=g-import-not-at-top
  from paligemma.checkpoint import tree  # pylint: disable=g-import-not-at-top
  from paligemma.models import build  # pylint: disable=g-import-not-at-top
  from paligemma.trainer import step as step_lib  # pylint: disable=g-import-not-at-top

  model = build.build_model(preset["model"], dtype=preset["dtype"],
                            lora=dict(rank=RANK, alpha=8.0, targets="peft"))
  batch = {k: jnp.asarray(v) for k, v in train_step._batch(preset).items()}  # pylint: disable=protected-access
  params = tree.flatten(build.initial_params(model, jax.random.PRNGKey(0)))
  trainable = lora_lib.adapters(params)
  frozen = {k: v for k, v in params.items() if k not in trainable}
  tx = optax.adam(1e-4, b2=0.999)
  opt_state = tx.init(trainable)
  # The output layer on the batch's loss tokens, as the trainer runs it.
  step = jax.jit(functools.partial(step_lib.make_train_step(model, tx, lambda s: 1e-4),
                                   loss_len=step_lib.loss_length(batch["mask_loss"])),
                 donate_argnums=(0, 2))
  state = {"t": trainable, "o": opt_state}
  count = jnp.int32(0)

  def one():
    state["t"], state["o"], m = step(state["t"], frozen, state["o"], batch, count)
    return m["loss"]
  sec = common.timed(one, preset["steps"], jax.block_until_ready)
  n = sum(v.size for v in trainable.values())
  return dict(device=str(jax.devices()[0].device_kind), examples_per_s=preset["batch"] / sec,
              step_ms=1e3 * sec, trainable_params=float(n))


def theirs(preset):
  import peft  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  config = peft.LoraConfig(r=RANK, lora_alpha=8, target_modules=PEFT_MODULES)
  sec, params = train_step.torch_steps(preset, lambda m: peft.get_peft_model(m, config), 1e-4)
  dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
  return dict(device=dev, examples_per_s=preset["batch"] / sec, step_ms=1e3 * sec,
              trainable_params=float(sum(p.numel() for p in params)))


def base_memory(model_config):
  """{"float16" | "nf4" | "int8": GiB} of the frozen base under LoRA (shapes only)."""
  import jax  # pylint: disable=g-import-not-at-top
  from paligemma import lora as lora_lib  # pylint: disable=g-import-not-at-top
  from paligemma import quant  # pylint: disable=g-import-not-at-top
  from paligemma.checkpoint import tree  # pylint: disable=g-import-not-at-top
  from paligemma.models import build  # pylint: disable=g-import-not-at-top

  model = build.build_model(model_config, lora=dict(rank=RANK, targets="peft"))
  shapes = tree.flatten(build.abstract_params(model))
  frozen = {k: jax.ShapeDtypeStruct(v.shape, "float16") for k, v in shapes.items()
            if not lora_lib.is_lora_leaf(k)}
  out = {"float16": sum(2 * math.prod(v.shape) for v in frozen.values()) / 2**30}
  for kind in ("nf4", "int8"):
    q = jax.eval_shape(lambda f, kind=kind: lora_lib.quantize_frozen(dict(f), kind), frozen)
    out[kind] = sum(quant.nbytes(v) for v in q.values()) / 2**30
  return out


def main():
  ran = common.cli(__doc__, __file__, ours, theirs)
  if ran is None:
    return
  args, _ = ran
  from paligemma import transfer_configs  # pylint: disable=g-import-not-at-top
  for name, cfg in ((args.preset, common.PRESETS[args.preset]["model"]),
                    ("PaliGemma 2 3B", transfer_configs.pretrained_model("paligemma2-3b"))):
    mem = base_memory(cfg)
    print(f"  frozen base of {name}: " + ", ".join(f"{k} {v:.3f} GiB" for k, v in mem.items()))


if __name__ == "__main__":
  clean_exit.run(main)
