"""Inference with trained models: reconstruct images through the autoencoder, sample new ones."""
