"""The hand-written checkpoint shapes (checkpoint/shapes.py) are the model's own
(`build.abstract_params`: jax.eval_shape of its init, nothing allocated)."""

import pytest

from paligemma.checkpoint import shapes
from paligemma.checkpoint import tree
from paligemma.models import build
from conftest import tiny_model_config

CASES = {
    "gemma_tiny": tiny_model_config(1, patch=4, image_size=16, vocab_size=512),
    "gemma2_tiny": dict(img=dict(variant="mu/8", width=64, depth=2, image_size=32),
                        llm=dict(variant="gemma2_tiny", vocab_size=1920)),
    # As many kv heads as heads: the fused qkv_einsum.
    "gemma_tiny_mha": tiny_model_config(1, patch=4, image_size=16, num_kv_heads=4),
    # The released towers.
    "pg2_3b_224": dict(img=dict(variant="So400m/14", image_size=224),
                       llm=dict(variant="gemma2_2b")),
    "pg1_3b_448": dict(img=dict(variant="So400m/14", image_size=448),
                       llm=dict(variant="gemma_2b")),
    "pg2_28b_224": dict(img=dict(variant="So400m/14", image_size=224),
                        llm=dict(variant="gemma2_27b")),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_param_shapes_are_the_models(name):
  config = CASES[name]
  model = build.build_model(config)
  want = {k: tuple(v.shape) for k, v in tree.flatten(build.abstract_params(model)).items()}
  assert {k: tuple(v) for k, v in shapes.param_shapes(config).items()} == want
  # The resolved configs give the same shapes as the dicts they came from.
  assert shapes.param_shapes({"img": model.img, "llm": model.llm}) == shapes.param_shapes(config)
