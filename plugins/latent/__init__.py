"""Model-level latents: components that run the blocks over a shorter sequence (core.interfaces.Latent)."""
