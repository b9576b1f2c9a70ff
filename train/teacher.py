"""The frozen teacher of distillation: which model it is, whether it can teach this student, and loading it."""

from __future__ import annotations

import torch

from .recipe import Recipe


def teacher_source(recipe: Recipe) -> str:
    return recipe.distill.teacher or recipe.model.path


def teacher_dtype(recipe: Recipe) -> torch.dtype:
    """The dtype the student computes in: the precision's half type, else the model's."""
    precision = str(recipe.run.precision)
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return getattr(torch, recipe.model.dtype)


def check_teacher(recipe: Recipe) -> None:
    """Refuse, in one line, a teacher that cannot teach the student token for token: a DMC model, another
    vocabulary size or another tokenizer."""
    from transformers import AutoTokenizer

    from dmc.hub import model_config

    if recipe.base_teaches:
        return  # the frozen base teaches itself (the method switched off): no teacher is loaded
    source = teacher_source(recipe)
    what = "distill.teacher" if recipe.distill.teacher else "distill.teacher (default: model.path)"
    teacher = model_config(source, what)
    if teacher.model_type in ("dmc_llama", "dms_llama"):
        kind = "DMC" if teacher.model_type == "dmc_llama" else "DMS"
        raise ValueError(f"{what}={source!r} is a {kind} model; distil from the unmodified source model: set "
                         "distill.teacher to the vanilla Llama folder or Hub id")
    student = model_config(recipe.model.path, "model.path")
    if teacher.vocab_size != student.vocab_size:
        raise ValueError(f"{what}={source!r} has a vocabulary of {teacher.vocab_size} tokens, the student "
                         f"model.path={recipe.model.path!r} {student.vocab_size}: distillation compares "
                         "next-token distributions token by token; use a teacher with the student's tokenizer")
    if source == recipe.model.path:
        return
    try:
        theirs = AutoTokenizer.from_pretrained(source).get_vocab()
    except (OSError, ValueError):
        raise ValueError(f"{what}={source!r} has no tokenizer to compare with the student's; save the "
                         "tokenizer with the teacher (tokenizer.save_pretrained)") from None
    ours = AutoTokenizer.from_pretrained(recipe.model.path).get_vocab()
    if theirs != ours:
        differ = sum(ours.get(t) != i for t, i in theirs.items())
        raise ValueError(f"{what}={source!r} has another tokenizer than model.path ({differ} of {len(theirs)} "
                         "tokens map to other ids): distillation needs the student's tokenizer")


def load_teacher(recipe: Recipe, device: torch.device):
    """The teacher in eval mode, without gradients, in the training dtype, on ``device``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher_source(recipe), dtype=teacher_dtype(recipe))
    return model.to(device).eval().requires_grad_(False)
