"""Flax modules: the SigLIP ViT tower, the Gemma decoder and the joined PaliGemma model."""
