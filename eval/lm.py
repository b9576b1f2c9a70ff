"""One evaluation interface for a vanilla Llama folder and a DMC or DMS folder.

DMC and DMS models always run real compressed inference: every forward fills the method's cache (one-pass
prefill, which equals token-by-token decoding on that cache) and generation decodes on it. The cache's live
slots after each call feed the realised-CR meter, so every task reports the CR it actually ran at.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from dmc.generate import generate, load
from dmc.gqa import SOURCE_KV_HEADS, kv_compression
from dmc.methods import method_of, new_cache
from dmc.metrics import head_dim
from dmc.ops.kv_quant import check_bits, resolve_group
from dmc.paged_slots import slot_bytes
from dmc.schedule import cr_from_merges

from .fingerprint import folder_digest, model_fingerprint


def cache_counts(cache, tokens: torch.Tensor) -> list[dict]:
    """Per sequence: merges (L x H_kv: tokens minus live slots) and tokens, as storable lists."""
    slots = torch.stack([cache.num_slots(i) for i in range(len(cache.layers))]).cpu()  # (L, B, H_kv)
    tokens = tokens.cpu()
    return [{"merges": (tokens[b] - slots[:, b]).tolist(), "tokens": int(tokens[b])} for b in range(len(tokens))]


class CRMeter:
    """Sums per-sequence counts (from ``cache_counts``): realised CR overall, per layer and per head."""

    def __init__(self, fixed_cr: float = 1.0):
        self.merges: torch.Tensor | None = None  # (L, H_kv)
        self.tokens = 0
        self.fixed_cr = fixed_cr  # models without a compressing cache: 1, or a GQA model's KV-head ratio

    def add(self, counts: dict | None) -> None:
        if not counts:
            return
        m = torch.tensor(counts["merges"], dtype=torch.float64)
        self.merges = m if self.merges is None else self.merges + m
        self.tokens += counts["tokens"]

    def summary(self) -> dict:
        if self.merges is None:
            return {"realised_cr": self.fixed_cr}
        cr = cr_from_merges(self.merges, self.tokens)
        return {"realised_cr": cr["cr"], "cr_per_layer": cr["per_layer"].tolist(), "cr_per_head": cr["per_head"].tolist()}


class EvalModel:
    """A model folder, optionally run under a baseline cache ``policy`` (``eval.policies``; vanilla Llama
    folders only). DMC models and policies are "compressed": every call goes through their cache."""

    def __init__(self, path: str | Path, dtype: str = "float32", device: str = "cpu", batch_size: int = 4,
                 max_length: int | None = None, policy=None, kv_bits: int = 16, kv_group: int | None = None):
        self.path = str(path)
        self.dtype = dtype
        self.model, self.tok = load(path, dtype, device)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = max_length or getattr(self.model.config, "max_position_embeddings", 2048)
        self.method = method_of(self.model.config)  # DMC, DMS, or None (a vanilla model)
        self.kv_bits = check_bits(kv_bits)
        D = head_dim(self.model.config)
        own_group = getattr(self.model.config, self.method.field("kv_group"), None) if self.method else None
        group = kv_group or own_group  # None: the width's default
        if kv_bits < 16 and group is not None and (group < 1 or D % min(group, D)):
            raise ValueError(f"--kv-group {group} must divide the head dim {D} of {path} (e.g. 32 or 16)")
        self.kv_group = resolve_group(kv_bits, group, D) if kv_bits < 16 else None
        label = policy.label if policy is not None else None
        if self.method is not None:  # every new cache of the method reads them
            setattr(self.model.config, self.method.field("kv_bits"), kv_bits)
            if kv_bits < 16:
                setattr(self.model.config, self.method.field("kv_group"), self.kv_group)
        elif policy is None and kv_bits < 16:  # a vanilla model on coded storage: every token kept, as its own
            from .policies import KeepAll

            policy = KeepAll()
        self.policy = policy
        if policy is not None:
            if self.model.config.model_type != "llama":
                raise ValueError(f"--policy runs on a vanilla Llama folder; {path} is {self.model.config.model_type!r}")
            from .policies import apply_policy

            apply_policy(self.model)
        self.compressed = self.method is not None or policy is not None
        self.kv_cr = kv_compression(self.model.config)  # a GQA baseline's cache is smaller than its source's
        self.name, self.fingerprint = self._identity(label)
        self.folder = folder_digest(path)  # what lies on disk; every item store's header records it

    @property
    def is_dmc(self) -> bool:
        return self.method is not None and self.method.name == "dmc"

    def _identity(self, label: str | None) -> tuple[str, str]:
        """(name, fingerprint) of this model under the policy labelled ``label`` (None: none)."""
        bits, D = self.kv_bits, head_dim(self.model.config)
        grouped = bits < 16 and self.kv_group != resolve_group(bits, None, D)  # named only when not the default
        name = Path(self.path).name + (f"+{label}" if label else "") + (f"+int{bits}" if bits < 16 else "") + (
            f"g{self.kv_group}" if grouped else "")
        return name, model_fingerprint(self.path, self.model.config, self.dtype, self.device, label, bits, self.kv_group)

    def under(self, policy) -> EvalModel:
        """The same loaded model as the variant under ``policy`` (the same kind of policy at another budget): its
        name, fingerprint and description, for storing that variant's answers (``run.evaluate_variants``)."""
        view = copy.copy(self)
        view.policy = policy
        view.name, view.fingerprint = self._identity(policy.label)
        return view

    def cr_meter(self) -> CRMeter:
        return CRMeter(self.kv_cr)

    def new_cache(self, question_aware: bool = False, crs: list[float] | None = None):
        """A fresh compressed cache (DMC or the policy's; ``question_aware``: the policy compresses the prompt once,
        after prefill; ``crs``: one budget per batch row, the policy's kind at each CR), or None for the vanilla model."""
        if self.method is not None:
            return new_cache(self.model.config)
        if self.policy is not None:
            from dataclasses import replace

            from .policies import PolicyCache, RowBudgets

            policy = self.policy if crs is None else replace(self.policy, budget=RowBudgets(tuple(crs)))
            # dense: the paged reference's slots and decisions with less per-token bookkeeping (eval/policies/dense.py);
            # a policy that keeps everything stores a prompt in one pass, on the paged layout
            layout = "dense" if policy.evicts else "paged"
            return PolicyCache(self.model.config, policy, question_aware=question_aware, layout=layout,
                               kv_bits=self.kv_bits, kv_group=self.kv_group)
        return None

    def describe(self) -> dict:
        cfg = self.model.config
        info = {"path": self.path, "fingerprint": self.fingerprint, "folder": self.folder, "model_type": cfg.model_type, "dmc": self.is_dmc,
                "policy": self.policy.label if self.policy is not None else None, "kv_bits": self.kv_bits,
                "kv_group": self.kv_group, "kv_cr": self.kv_cr,
                "parameters": sum(p.numel() for p in self.model.parameters())}
        # bytes of a slot on this cache over a 16-bit one (codes, scales and minima at 8/4 bits)
        info["kv_slot_shrink"] = slot_bytes(head_dim(cfg), torch.float16, self.kv_bits, self.kv_group) / slot_bytes(
            head_dim(cfg), torch.float16)
        if self.kv_cr != 1.0:
            info["gqa"] = {"source_kv_heads": getattr(cfg, SOURCE_KV_HEADS), "kv_heads": cfg.num_key_value_heads}
        if self.method is not None:
            prefix = f"{self.method.name}_"
            info[f"{prefix}config"] = {k: v for k, v in cfg.to_dict().items() if k.startswith(prefix)}
        return info

    # ---- scoring ---------------------------------------------------------------------------------------
    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-evaluation-harness convention: trailing spaces of the context move to the continuation, the
        pair is tokenised whole, and the continuation is whatever follows the context's tokens."""
        spaces = len(context) - len(context.rstrip(" "))
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tok(context + continuation, add_special_tokens=True)["input_ids"]
        ctx = self.tok(context, add_special_tokens=True)["input_ids"]
        return ctx, whole[len(ctx):]

    @torch.no_grad()
    def forward_batch(self, seqs: list[list[int]], keep: int, crs: list[float] | None = None):
        """Left-padded forward of token lists through the cache (``crs``: each row's policy CR): (logits of the
        last ``keep`` positions, per-sequence cache counts or Nones for a vanilla model)."""
        T = max(len(s) for s in seqs)
        pad = self.tok.pad_token_id
        ids = torch.tensor([[pad] * (T - len(s)) + s for s in seqs], device=self.device)
        mask = torch.tensor([[0] * (T - len(s)) + [1] * len(s) for s in seqs], device=self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = self.new_cache(crs=crs)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                         use_cache=self.compressed, logits_to_keep=keep)
        counts = cache_counts(cache, mask.sum(-1)) if self.compressed else [None] * len(seqs)
        return out.logits.float(), counts

    def _fit(self, ctx: list[int], cont: list[int]) -> list[int]:
        return (ctx + cont)[-(self.max_length + 1):][:-1]  # the last token is only a target

    def loglikelihood(self, pairs: list[tuple[str, str]]) -> tuple[list[tuple[float, bool]], list[dict | None]]:
        """Per pair: (sum of log p(continuation | context), whether greedy decoding gives it) and cache counts."""
        encoded = [self.encode_pair(c, x) for c, x in pairs]
        for (_, cont), (c, _) in zip(encoded, pairs):
            if not cont:
                raise ValueError(f"empty continuation after context ...{c[-40:]!r}")
        results: list = [None] * len(pairs)
        counts: list = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -(len(encoded[i][0]) + len(encoded[i][1])))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            conts = [encoded[i][1] for i in chunk]
            keep = max(len(c) for c in conts)
            logits, batch_counts = self.forward_batch([self._fit(*encoded[i]) for i in chunk], keep)
            logp = F.log_softmax(logits, dim=-1)  # (B, keep, V)
            for row, (i, cont) in enumerate(zip(chunk, conts)):
                lp = logp[row, keep - len(cont):]
                target = torch.tensor(cont, device=lp.device)
                results[i] = (lp.gather(-1, target[:, None]).sum().item(), bool((lp.argmax(-1) == target).all()))
                counts[i] = batch_counts[row]
        return results, counts

    def choose(self, contexts: list[str], choices: list[str]) -> tuple[list[list[float]], list[dict | None]]:
        """Log-likelihood of each of the same ``choices`` after each context. When every choice is a single
        token after the context (MMLU's " A" .. " D"), one forward per context scores them all."""
        encoded = [[self.encode_pair(c, x) for x in choices] for c in contexts]
        single = all(len(cont) == 1 and ctx == enc[0][0] for enc in encoded for ctx, cont in enc)
        if not single:
            flat, counts = self.loglikelihood([(c, x) for c in contexts for x in choices])
            k = len(choices)
            return [[s for s, _ in flat[i * k : (i + 1) * k]] for i in range(len(contexts))], counts[::k]
        scores, counts = [], []
        for start in range(0, len(contexts), self.batch_size):
            chunk = encoded[start : start + self.batch_size]
            logits, batch_counts = self.forward_batch([enc[0][0][-self.max_length:] for enc in chunk], 1)
            logp = F.log_softmax(logits[:, -1], dim=-1)
            for row, enc in enumerate(chunk):
                scores.append([logp[row, cont[0]].item() for _, cont in enc])
            counts += batch_counts
        return scores, counts

    def block_nll(self, blocks: list[list[int]], crs: list[float] | None = None) -> tuple[list[tuple[float, int]],
                                                                                            list[dict | None]]:
        """Per token block: (summed negative log-likelihood of tokens 1.., their number) and cache counts (``crs``:
        each block's policy CR)."""
        out, counts = [], []
        for start in range(0, len(blocks), self.batch_size):
            chunk = blocks[start : start + self.batch_size]
            logits, batch_counts = self.forward_batch(chunk, max(len(b) for b in chunk),
                                                      crs[start : start + self.batch_size] if crs else None)
            for row, block in enumerate(chunk):
                lg = logits[row, logits.shape[1] - len(block) : -1]
                target = torch.tensor(block[1:], device=lg.device)
                out.append((F.cross_entropy(lg, target, reduction="sum").item(), len(block) - 1))
            counts += batch_counts
        return out, counts

    # ---- generation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def greedy(self, prompts: list[str], max_new_tokens: int, question_aware: bool = False,
               crs: list[float] | None = None) -> tuple[list[str], list[dict | None]]:
        """Greedy decoding of exactly ``max_new_tokens`` tokens per prompt, as ``generate()`` decodes (left padding,
        the same positions; a row that ends is fed padding) except that no batch stops early: every row's cache
        sees its prompt and ``max_new_tokens - 1`` more positions whatever its batch-mates do, so an item's answer
        and counts do not depend on which items share its batch. ``crs``: each prompt's policy CR; question-aware,
        equal prompts in a batch share one prefill (``PolicyCache.branch``)."""
        texts, counts = [], []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            chunk_crs = crs[start : start + self.batch_size] if crs else None
            t, c = self._greedy_batch(chunk, max_new_tokens, question_aware, chunk_crs)
            texts += t
            counts += c
        return texts, counts

    def _greedy_batch(self, prompts: list[str], n: int, question_aware: bool, crs: list[float] | None):
        from transformers import DynamicCache

        share = question_aware and crs is not None and self.kv_bits == 16 and self.policy is not None
        unique = list(dict.fromkeys(prompts)) if share else prompts
        batch = self.tok(unique, return_tensors="pt", padding=True).to(self.device)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as generate() numbers a left-padded prompt
        cache = self.new_cache(question_aware, None if share else crs)
        if share:
            cache.defer_compression()
        cache = cache if cache is not None else DynamicCache()
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                            use_cache=True, logits_to_keep=1).logits
        nxt = logits[:, -1].argmax(-1)
        if share:  # one prefill per distinct prompt, then one row per (prompt, CR), compressed to its budget
            rows = [unique.index(p) for p in prompts]
            cache.branch(rows, crs)
            index = torch.tensor(rows, device=self.device)
            mask, pos, nxt = mask[index], pos[index], nxt[index]
        eos = self.model.generation_config.eos_token_id
        eos = torch.tensor(eos if isinstance(eos, list) else [] if eos is None else [eos], device=self.device)
        done = torch.isin(nxt, eos)
        new = [nxt]
        for _ in range(n - 1):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            pos = pos[:, -1:] + 1
            logits = self.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, past_key_values=cache,
                                use_cache=True).logits
            nxt = torch.where(done, self.tok.pad_token_id, logits[:, -1].argmax(-1))
            done |= torch.isin(nxt, eos)
            new.append(nxt)
        new = torch.stack(new, 1)
        texts = self.tok.batch_decode(new, skip_special_tokens=True)
        if not self.compressed:
            return texts, [None] * len(prompts)
        seen = mask.sum(1)  # every prompt token and generated position but the last, as generate() counts
        return texts, cache_counts(cache, seen)

    def generate(self, prompts: list[str], max_new_tokens: int, stop: list[str] | None = None,
                 temperature: float = 0.0, seed: int = 0,
                 question_aware: bool = False) -> tuple[list[str], list[dict | None]]:
        texts, counts = [], []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            gen = generate(self.model, self.tok, chunk, max_new_tokens, temperature=temperature, seed=seed + start,
                           stop=stop, cache=self.new_cache(question_aware))
            texts += gen.texts
            counts += cache_counts(gen.cache, gen.tokens_seen) if gen.cache is not None else [None] * len(chunk)
        return texts, counts
