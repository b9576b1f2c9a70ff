"""Continued pretraining of DMC models with Lightning (+ DeepSpeed): the ``dmc train`` recipe."""
