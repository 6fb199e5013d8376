"""Checkpoints in and out: big_vision/Kaggle .npz, Hugging Face directories, kaggle: handles.

  params, model_config = load("paligemma2-3b-pt-224.b16.npz")      # or an HF dir,
  params, model_config = load("kaggle:google/paligemma-2/jax/paligemma2-3b-pt-224")
  save_npz(params, "out.npz", dtype="bfloat16")
  save_hf(params, model_config, "out_hf/")       # transformers from_pretrained reads it
  params, model_config = load("base_hf/", adapter="peft_adapter/")   # LoRA merged in
  save_peft(params, model_config, "adapter/", base="google/paligemma2-3b-pt-224")
"""

from paligemma.checkpoint.hf import save_hf
from paligemma.checkpoint.loader import describe, load, merge_config
from paligemma.checkpoint.npz import save_npz
from paligemma.checkpoint.peft import save_peft
from paligemma.checkpoint.shapes import infer_config, param_shapes
from paligemma.checkpoint.source import CheckpointError
from paligemma.checkpoint.tree import stack_layers, unstack_layers

__all__ = ["load", "save_npz", "save_hf", "save_peft", "describe", "merge_config",
           "infer_config", "param_shapes", "stack_layers", "unstack_layers", "CheckpointError"]
