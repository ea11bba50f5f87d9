"""The machinery beneath the stages: what train.py, evaluate.py and the drivers share.

The stages (prepare_data.py, model.py, train.py, evaluate.py, fewshot.py, ablate.py, analyze.py,
report.py, export.py) sit at the top of the repository and link by files on disk; this package
holds what they have in common, one concept a module (docs/DESIGN.md has the map).
"""
