"""mlecli: neural networks trained on MNIST by maximum likelihood, with numpy only."""

__version__ = "0.1.0"
