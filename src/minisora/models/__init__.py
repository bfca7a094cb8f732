"""Plain nn.Modules: denoiser, autoencoder, text encoder and their shared layers; never imports Lightning.

Import from the submodules (minisora.models.dit, .text, ...): keeping this file empty means importing the
denoiser does not pay for importing open_clip.
"""
