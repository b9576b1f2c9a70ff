"""lm-evaluation-harness model ``dmc``: any harness task on a vanilla or DMC folder, on the DMC cache.

    dmc lm-eval --model dmc --model_args pretrained=DIR[,dtype=float32,device=cpu,batch_size=4] --tasks <tasks>

``dmc lm-eval`` is the harness's own command line with this module imported first. The package also
declares an ``lm_eval.models`` entry point, so harness releases that discover plugins accept plain
``lm_eval --model dmc`` (0.4.13, the newest on PyPI, does not yet); in Python, import this module
before calling ``lm_eval.simple_evaluate``. The realised CR of everything the harness asked for is
logged at the end of each request type and kept in ``DMCLM.meter``.
"""

from __future__ import annotations

import logging

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from .lm import EvalModel

log = logging.getLogger(__name__)


@register_model("dmc")
class DMCLM(LM):
    def __init__(self, pretrained: str, dtype: str | None = None, device: str | None = None, batch_size=4,
                 max_length: int | None = None, **_ignored):
        super().__init__()
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            if device is not None:  # the harness's own default is cuda, asked for or not
                log.warning("dmc: device %s is not available here; running on cpu", device)
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = dtype or ("bfloat16" if str(device).startswith("cuda") else "float32")
        bs = 4 if batch_size in (None, "auto") else int(str(batch_size).split(":")[0])
        self.lm = EvalModel(pretrained, dtype, device, bs, int(max_length) if max_length else None)
        self.meter = self.lm.cr_meter()

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        # the harness passes its --batch_size/--device too; what model_args says wins
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    def _count(self, counts, what: str) -> None:
        for c in counts:
            self.meter.add(c)
        if self.lm.compressed or self.lm.kv_cr != 1.0:
            log.info("dmc: %s ran at realised CR %.3f (all requests so far)", what, self.meter.summary()["realised_cr"])

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        pairs = [tuple(r.args[:2]) for r in requests]
        out = []
        step = 64 * self.lm.batch_size  # chunks, so the progress bar moves
        for start in tqdm(range(0, len(pairs), step), disable=disable_tqdm, desc="dmc loglikelihood"):
            res, counts = self.lm.loglikelihood(pairs[start : start + step])
            out += res
            self._count(counts, "loglikelihood")
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        """Whole-string log-likelihood: non-overlapping windows of max_length tokens, each after a BOS/EOS."""
        out = []
        tok = self.lm.tok
        prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        for r in tqdm(requests, disable=disable_tqdm, desc="dmc loglikelihood_rolling"):
            ids = tok(r.args[0], add_special_tokens=False)["input_ids"]
            win = self.lm.max_length - 1
            blocks = [[prefix] + ids[i : i + win] for i in range(0, len(ids), win)]
            scores, counts = self.lm.block_nll(blocks)
            out.append(-sum(nll for nll, _ in scores))
            self._count(counts, "loglikelihood_rolling")
        return out

    def generate_until(self, requests, disable_tqdm: bool = False):
        out = []
        for r in tqdm(requests, disable=disable_tqdm, desc="dmc generate_until"):
            context, kw = r.args[0], dict(r.args[1] or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            sample = bool(kw.get("do_sample", False))
            texts, counts = self.lm.generate([context], int(kw.get("max_gen_toks", 256)), stop=until or None,
                                             temperature=float(kw.get("temperature", 1.0)) if sample else 0.0)
            out.append(texts[0])
            self._count(counts, "generate_until")
        return out
