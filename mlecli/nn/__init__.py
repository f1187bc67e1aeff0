"""The network and its training arithmetic: pure numpy, no files, no printing.

Owns the model (sigmoid hidden layers, the log-likelihood and its gradient by
backpropagation: model.py, the reference the tests hold everything else to), the update
rules (optim.py), learning-rate schedules (schedule.py), the figures of a classifier
(metrics.py), images as the network's inputs (pixels.py), and, kept apart from the
reference, the fast in-place training step (step.py) with its BLAS binding (blas.py).

May import: numpy and the standard library; nothing else of mlecli.
"""
