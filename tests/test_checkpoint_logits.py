"""ours -> Hugging Face export -> transformers: logits match our model's within 1e-4."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from paligemma import checkpoint
from paligemma.models import paligemma as paligemma_model
from conftest import random_params, tiny_model_config

CASES = {
    "paligemma1": tiny_model_config(1),
    # Window shorter than the 4 image + 8 text tokens, so the local layers matter.
    "paligemma2": tiny_model_config(2, sliding_window=6),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_logits_match(tmp_path, case):
  config = CASES[case]
  params = jax.tree.map(lambda x: x * 0.1, random_params(config, seed=1))
  rng = np.random.default_rng(0)
  text = rng.integers(4, 300, (2, 8)).astype(np.int32)
  mask_ar = np.array([[0] * 3 + [1] * 5] * 2, np.int32)  # Prefix of 3, causal suffix of 5.
  image = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  model = paligemma_model.Model(**config)
  ours, _ = model.apply({"params": params}, jnp.asarray(image), jnp.asarray(text),
                        jnp.asarray(mask_ar))

  checkpoint.save_hf(params, config, tmp_path / "hf")
  hf = transformers.PaliGemmaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
  n = 4
  ids = torch.cat([torch.full((2, n), 300), torch.from_numpy(text).long()], 1)
  types = torch.cat([torch.zeros(2, n, dtype=torch.long), torch.from_numpy(mask_ar).long()], 1)
  with torch.no_grad():
    theirs = hf(input_ids=ids, pixel_values=torch.from_numpy(image.transpose(0, 3, 1, 2)),
                token_type_ids=types, attention_mask=torch.ones_like(ids)).logits.numpy()
  err = np.abs(np.asarray(ours) - theirs[:, n:, :300]).max()
  print(f"{case}: max abs logit error {err:.2e}")
  assert err < 1e-4, err
