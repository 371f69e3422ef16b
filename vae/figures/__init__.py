"""A trained model's figures (model_figures.py: reconstructions, samples, latent space, manifold, interpolation,
the same for the loop, the trackers and evaluate.py) and the matplotlib drawing under them (plots.py)."""
