"""Scaling analysis: collect run directories, fit scaling laws, draw figures, write the report."""

# What a study can count as a model's size (N) and its training data (D).
N_KINDS = {"params": "total parameters", "params_no_embed": "parameters without patch embedding"}
D_KINDS = {"images": "images seen", "patches": "patches seen (images x patches per image)"}
