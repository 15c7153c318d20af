"""edgeforge: compile Llama-family checkpoints into self-verifying deployment bundles."""

__version__ = "0.1.0"
