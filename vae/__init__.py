"""Variational autoencoder on MNIST, trained through Hugging Face Accelerate (CPU, GPU, DDP, Slurm)."""
