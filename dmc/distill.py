"""Distillation from a frozen teacher: a KL divergence between next-token distributions, the reference.

``forward`` is KL(teacher || student): the student must cover every token the teacher gives mass to (the
usual choice, Hinton et al. 2015). ``reverse`` is KL(student || teacher): mode-seeking, the student may drop
the teacher's low-probability tokens. Both at temperature T, scaled by T^2 so that the gradient's size does
not depend on T.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DIRECTIONS = ("forward", "reverse")


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, direction: str = "forward",
                    temperature: float = 1.0) -> torch.Tensor:
    """Mean over positions of the KL between softmax(teacher / T) and softmax(student / T), times T^2.

    student_logits, teacher_logits: (..., V), the same shape. Computed in fp32 (bf16 logits would round the
    small differences this term is about). Gradients flow into ``student_logits`` only.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r}: use one of {', '.join(DIRECTIONS)}")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: the two models need the same vocabulary")
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    if direction == "forward":
        kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    else:
        kl = (log_s.exp() * (log_s - log_t)).sum(-1)
    return kl.mean() * temperature**2
