"""The datasets: the registry of what a dataset is (datasets.py), the IDX format (idx.py),
HTTP under a watchdog (http.py), one file fetched from its mirrors and verified
(download.py), the cache of verified raw files (cache.py) and the splits built from them
(splits.py).

May import: mlecli.safe (and numpy, requests); never the layers above (run, use, sweep,
cli) nor mlecli.nn.
"""
