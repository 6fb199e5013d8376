"""Tiny random transformers PaliGemma models, saved in the real Hugging Face layout.

Shared by the model-parity and checkpoint tests. The vocabulary keeps the real layout
(257_152 ids + 64 padding rows, image token 257_152) so trimming is exercised.
"""

import torch
import transformers

HF_VOCAB = 257_216
IMAGE_TOKEN = 257_152


def tiny_config(version, image_size=16, patch_size=4, sliding_window=8):
  """transformers.PaliGemmaConfig for a tiny PaliGemma 1 (version=1) or 2 (version=2)."""
  vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=48,
                num_hidden_layers=2, num_attention_heads=2, patch_size=patch_size,
                image_size=image_size, vision_use_head=False)
  text = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              head_dim=16, vocab_size=HF_VOCAB, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh")
  if version == 1:
    text.update(model_type="gemma", num_key_value_heads=1)
  else:
    text.update(model_type="gemma2", num_key_value_heads=2, query_pre_attn_scalar=16,
                attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                sliding_window=sliding_window)
  return transformers.PaliGemmaConfig(
      vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
      projection_dim=64, hidden_size=64, vocab_size=HF_VOCAB)


def make_tiny_hf(directory, version, seed=0, **kw):
  """Saves a random tiny PaliGemma with `save_pretrained`; returns the torch model."""
  torch.manual_seed(seed)
  model = transformers.PaliGemmaForConditionalGeneration(tiny_config(version, **kw))
  # Random init leaves norms at their identity values; perturb every parameter so a
  # mapping error (a transposed kernel, a norm taken for another) cannot hide.
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  model = model.float().eval()
  model.save_pretrained(directory)
  return model
