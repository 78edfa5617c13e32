"""Periodic validation for the trainer: training/main.py builds it from the evaluator and hands the trainer a plain
callable, so the training package never imports evaluation (only its entry point does)."""
from __future__ import annotations

from common.transforms import build_transform
from evaluation.evaluate import evaluate_model
from evaluation.extract import EvalError, resolve_shards  # noqa: F401  (EvalError: what validator raises)


def validator(val_data: str, device):
    """``validate(model, tokenizer, image_size) -> {"val": metrics}`` on the test set ``val_data``. Its shards are
    resolved now, so a typo fails before the first epoch rather than after it (EvalError)."""
    resolve_shards(val_data)

    def validate(model, tokenizer, image_size) -> dict:
        return evaluate_model(model, tokenizer, build_transform(image_size, train=False), {"val": val_data}, device)
    return validate
