"""Networks: the VOSR denoiser (dit), the DINOv2-compatible encoder (vit), the autoencoders (vae)."""
