"""lm-evaluation-harness model ``dmc``: the harness's own ``HFLM`` with the DMC cache underneath.

    dmc lm-eval --model dmc --model_args pretrained=DIR[,dtype=float32,device=cpu] --batch_size auto --tasks ...

Batching, ``batch_size=auto``, chat templates, rolling windows, truncation and generation are HFLM's, so a
score differs from ``--model hf``'s only through the model: a DMC folder runs on its compressed cache (its
forward is the cache's one-pass prefill, generation decodes on a ``DMCCache``); a vanilla folder is plain
HFLM. The realised CR of everything the harness ran is logged and reported in the results JSON (the
``dmc_realised_cr`` fields of ``config``, through ``get_model_info``). ``dmc lm-eval`` is the harness's own
command line with this module imported, so ``--model hf``, ``vllm`` and every other model work there too.
"""

from __future__ import annotations

import logging

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM  # importing lm_eval.models registers the harness's own models

from dmc.gqa import kv_compression
from dmc.methods import is_compressed
from dmc.metrics import freed_slots

from .lm import CRMeter, cache_counts

log = logging.getLogger(__name__)


@register_model("dmc")
class DMCLM(HFLM):
    def __init__(self, pretrained, device: str | None = None, dtype: str | None = None, **kwargs):
        import dmc.dms_modeling  # noqa: F401  (registers dms_llama, so HFLM's AutoModelForCausalLM loads our class)
        import dmc.modeling  # noqa: F401  (registers dmc_llama)

        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            if device is not None:  # the harness's own default is cuda, asked for or not
                log.warning("dmc: device %s is not available here; running on cpu", device)
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = dtype or ("bfloat16" if str(device).startswith("cuda") else "float32")
        super().__init__(pretrained=pretrained, device=device, dtype=dtype, **kwargs)
        config = self.model.config
        self.compressed = is_compressed(config)  # DMC or DMS: their requests run on the compressed cache
        self.meter = CRMeter(kv_compression(config))  # a GQA baseline's fixed CR; a vanilla model's 1

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        # the harness also passes its own --batch_size/--device: what --model_args says wins (HFLM would raise)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    def _count(self, merges: torch.Tensor, tokens: torch.Tensor) -> None:
        """Add one batch's cache counts: ``merges`` (L, B, H_kv), ``tokens`` (B,)."""
        for b in range(tokens.shape[0]):
            self.meter.add({"merges": merges[:, b].tolist(), "tokens": int(tokens[b])})

    def _model_call(self, inps, attn_mask=None, labels=None):
        if not self.compressed:
            return super()._model_call(inps, attn_mask, labels)
        with torch.no_grad():
            out = self.model(inps, use_cache=True)  # the compressed cache's prefill: equal to decoding on it
        freed, tokens = freed_slots(out)
        self._count(freed.cpu(), tokens.cpu())
        return out.logits

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
        if not self.compressed:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        out = super()._model_generate(context, max_length, stop, return_dict_in_generate=True,
                                      **generation_kwargs)
        pads = (context == self.tokenizer.pad_token_id).cumprod(-1).sum(-1).cpu()  # the left padding
        for counts in cache_counts(out.past_key_values, out.past_key_values.get_seq_length() - pads):
            self.meter.add(counts)
        return out.sequences

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        summary = self.meter.summary()
        if self.compressed:
            log.info("dmc: the harness's requests ran at realised CR %.3f", summary["realised_cr"])
        info["dmc_realised_cr"] = summary["realised_cr"]
        if "cr_per_layer" in summary:
            info["dmc_realised_cr_per_layer"] = summary["cr_per_layer"]
        info["dmc_tokens"] = self.meter.tokens
        return info
