"""The version of mlecli (in the package's metadata, every run's manifest and checkpoints)."""

__version__ = "0.1.0"
