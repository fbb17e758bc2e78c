"""cfgdiff: classifier-free diffusion guidance (Ho & Salimans 2022) in JAX/Flax."""

__version__ = "0.1.0"
