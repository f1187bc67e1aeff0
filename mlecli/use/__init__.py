"""Using a trained network: predictions on new images (predict.py, behind `mlecli.load`),
reading what a user gives (inputs.py) and preparing it as the dataset's images were made
(preparation.py), the sheet of what the network saw (sheet.py), exports to ONNX and a page to draw
on (export.py), and pictures of a run (plot.py).

May import: mlecli.run and everything below it; never sweep or cli.
"""
