"""ditgraft: graft new operators into pretrained diffusion transformers."""

__version__ = "0.1.0"
