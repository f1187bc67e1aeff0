"""mlecli: neural networks trained on MNIST by maximum likelihood, with numpy only."""

from mlecli.version import __version__

__all__ = ["__version__", "load"]


def load(path, checkpoint: str = "best"):
    """A trained network as a Model: `mlecli.load("runs/default-…").predict_proba("digit.png")`.

    `path` is a run folder (its `checkpoint`: best, last or epoch-N) or a checkpoint file.
    See mlecli.use.predict.Model. (Imported here on first use: `import mlecli` stays instant.)
    """
    from mlecli.use.predict import load_model  # lazy: `import mlecli` loads no numpy

    return load_model(path, checkpoint)
