"""Many runs: a sweep's plan from a grid and seeds (grid.py), its record sweep.json
(record.py), what is left to do and carrying it out (runner.py) in worker processes
(workers.py) or on a Dask cluster (cluster.py), the runs side by side (runs.py) and per
grid point (compare.py).

May import: every layer below (use, run, data, nn, safe); never cli.
"""
