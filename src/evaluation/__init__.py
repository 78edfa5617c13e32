"""Text-to-image person retrieval evaluation (protocol: docs/EVAL.md).

- :mod:`evaluation.metrics`: pure metric functions of similarities and ids.
- :mod:`evaluation.extract`: test-set loading from shards, feature extraction.
- :mod:`evaluation.evaluate`: ``evaluate_model`` for the trainer and the ``scripts/eval.sh`` command line.
- :mod:`evaluation.plots`: CMC curve and retrieval-example figures.
"""
