"""Text-to-image person retrieval evaluation: the command lines around the protocol (docs/EVAL.md).

- :mod:`evaluation.evaluate`: the ``scripts/eval.sh`` command line: which weights, which data, the reports.
- :mod:`evaluation.plots`: CMC curve and retrieval-example figures.
- :mod:`evaluation.export_onnx`: ONNX export, checked against PyTorch.

The protocol itself (test sets, metrics, a model scored on test sets) is :mod:`fast_clip.retrieval`, below both this
package and the trainer's periodic validation.
"""
