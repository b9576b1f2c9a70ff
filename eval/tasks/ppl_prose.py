"""Perplexity on English prose that no recipe trains on (Python's reference manual topics, which the stdlib
training source leaves out): how much a retrofit on code costs off its training domain."""

from __future__ import annotations

from . import ppl

SETTINGS = ppl.SETTINGS


def run(model, opts, folder) -> dict:
    return ppl.run(model, opts, folder, source="prose", task="ppl_prose")


def run_sweep(model, variants: list, opts, folder) -> list[dict]:
    return ppl.run_sweep(model, variants, opts, folder, source="prose", task="ppl_prose")
