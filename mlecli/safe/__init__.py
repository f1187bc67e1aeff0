"""Doing things safely: the exception family, files written by atomic rename and read
defensively, folder locks and who holds them, .npz files, the schema of what mlecli reads
back from its own files, the machine's memory and disk against what a training needs,
and where outputs may go.

Owns errors.py (every message a user sees comes from an MlecliError), files.py,
locks.py, npz.py, schema.py, resources.py and outputs.py.

May import: the standard library and numpy; nothing else of mlecli.
"""
