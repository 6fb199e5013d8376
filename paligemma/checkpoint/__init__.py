"""Checkpoints in and out: big_vision/Kaggle .npz, Hugging Face directories, kaggle: handles.

  params, model_config = load("paligemma2-3b-pt-224.b16.npz")      # or an HF dir,
  params, model_config = load("kaggle:google/paligemma-2/jax/paligemma2-3b-pt-224")
  save_npz(params, "out.npz", dtype="bfloat16")
  save_hf(params, model_config, "out_hf/")       # transformers from_pretrained reads it
"""

from paligemma.checkpoint.hf import save_hf
from paligemma.checkpoint.loader import describe, load, merge_config
from paligemma.checkpoint.npz import save_npz
from paligemma.checkpoint.shapes import infer_config, param_shapes
from paligemma.checkpoint.source import CheckpointError
from paligemma.checkpoint.tree import stack_layers, unstack_layers

__all__ = ["load", "save_npz", "save_hf", "describe", "merge_config", "infer_config",
           "param_shapes", "stack_layers", "unstack_layers", "CheckpointError"]
