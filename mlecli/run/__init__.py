"""A training run and its folder: the config (config.py), the task built from the cached
data (task.py), the training loop (train.py), its signals (signals.py), resuming a run and
repairing its folder (resume.py), checkpoints (checkpoint.py), the run folder, its
manifest and metrics (rundir.py), and a checkpoint measured on held-out data
(evaluate.py).

May import: mlecli.data, mlecli.nn and mlecli.safe; never use, sweep or cli.
"""
