"""Conditions: what a denoiser is conditioned on, batched like a tensor.

A :class:`Condition` holds any of prompt embeddings, pooled embeddings (SDXL, SD3, Flux),
micro-conditioning time ids (SDXL), class labels, and a flow-map student's jump length, together
with the matching *null* (unconditional) branch that the teacher's own pipeline would use, so
``cond.null()`` is all classifier-free guidance needs.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, fields
from typing import Optional, Sequence

import torch
from torch import Tensor

NULL_CLASS = -1  # class label of the unconditional branch; adapters map it to their own null index


@dataclass
class Condition:
    prompt_embeds: Optional[Tensor] = None  # (B, L, D) text-encoder hidden states
    pooled_embeds: Optional[Tensor] = None  # (B, D') pooled text embedding (SDXL text_encoder_2)
    time_ids: Optional[Tensor] = None  # (B, 6) SDXL micro-conditioning (orig size, crop, target size)
    class_labels: Optional[Tensor] = None  # (B,) long; NULL_CLASS for unconditional
    null_prompt_embeds: Optional[Tensor] = None  # the unconditional branch's prompt embeddings
    null_pooled_embeds: Optional[Tensor] = None
    # (B,) guidance w in LCM's form (w = guidance_scale - 1) for students with a guidance embedding
    # (diffusers' time_cond_proj_dim); None for teachers and students without one
    guidance_w: Optional[Tensor] = None
    jump: Optional[Tensor] = None  # (B,) flow-map jump length d (students with a jump input only)

    # ---- batching -----------------------------------------------------------------------------
    def _map(self, fn) -> "Condition":
        return Condition(**{f.name: (None if getattr(self, f.name) is None else fn(getattr(self, f.name)))
                            for f in fields(self)})

    def __len__(self) -> int:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None:
                return v.shape[0]
        return 0

    def __getitem__(self, idx) -> "Condition":
        return self._map(lambda v: v[idx])

    def to(self, device=None, dtype=None) -> "Condition":
        def move(v: Tensor) -> Tensor:
            if dtype is not None and v.is_floating_point():
                return v.to(device=device, dtype=dtype)
            return v.to(device=device)

        return self._map(move)

    def repeat(self, n: int) -> "Condition":
        """Repeat every sample ``n`` times (``repeat_interleave`` on the batch axis)."""
        return self._map(lambda v: v.repeat_interleave(n, dim=0))

    @property
    def is_empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in fields(self))

    def null(self) -> "Condition":
        """The unconditional branch for classifier-free guidance."""
        out = dataclasses.replace(self)
        if self.prompt_embeds is not None:
            if self.null_prompt_embeds is None:
                raise ValueError("this condition has prompt embeddings but no null branch to guide against")
            out.prompt_embeds = self.null_prompt_embeds
            out.pooled_embeds = self.null_pooled_embeds if self.null_pooled_embeds is not None else self.pooled_embeds
        if self.class_labels is not None:
            out.class_labels = torch.full_like(self.class_labels, NULL_CLASS)
        return out

    @staticmethod
    def cat(conds: Sequence["Condition"]) -> "Condition":
        first = conds[0]
        kw = {}
        for f in fields(first):
            vals = [getattr(c, f.name) for c in conds]
            if all(v is None for v in vals):
                kw[f.name] = None
            elif any(v is None for v in vals):
                raise ValueError(f"cannot concatenate conditions: field {f.name!r} is missing in some")
            else:
                kw[f.name] = torch.cat(vals, dim=0)
        return Condition(**kw)


# fields of an encoded prompt that do not depend on the prompt: the pipeline's unconditional branch (its negative
# default, the empty prompt or zeros) and SDXL's micro-conditioning ids (from the resolution): cached once, not per row
PROMPT_INDEPENDENT = ("null_prompt_embeds", "null_pooled_embeds", "time_ids")


class PromptCache:
    """Encode each distinct prompt once (with the teacher pipeline's own encoder) and keep the result.

    ``encode_fn(list[str]) -> Condition`` is supplied by the teacher adapter and must return the null
    branch too.  ``get(prompts)`` returns a batched :class:`Condition` on CPU.

    Two ways to fill it: lazily, a batch's new prompts at a time (``get`` / ``warm``), or all at once before training
    (:meth:`prepare`: every prompt of a run, in chunks, into a row store of :mod:`fewstep.cache`, in memory or in
    safetensors shards on disk, the prompt-independent fields once).  Once the teacher has freed its text encoders
    (``encoder_available = False``), a prompt that :meth:`prepare` did not encode is an error.
    """

    def __init__(self, encode_fn, batch_size: int = 32):
        self._encode = encode_fn
        self._batch = batch_size
        self._cache: dict[str, Condition] = {}
        self._rows: Optional[dict[str, int]] = None  # after prepare(): prompt -> row of self.store
        self.store = None  # fewstep.cache MemoryRows / DiskRows (prepare)
        self.encoder_available = True

    def __len__(self) -> int:
        return len(self._cache) + (len(self._rows) if self._rows is not None else 0)

    @property
    def prepared(self) -> bool:
        return self._rows is not None

    def warm(self, prompts: Sequence[str]) -> None:
        todo = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if todo and not self.encoder_available:
            raise ValueError(f"prompt {todo[0]!r} was not encoded before the text encoders were freed "
                             "(data.free_text_encoders=true frees them once the run's prompts are cached); "
                             "set data.free_text_encoders=false to encode other prompts during the run")
        for i in range(0, len(todo), self._batch):
            chunk = todo[i:i + self._batch]
            with torch.no_grad():
                enc = self._encode(chunk).to("cpu")
            for j, p in enumerate(chunk):
                self._cache[p] = enc[j:j + 1]

    def prepare(self, prompts: Sequence[str], mode: str = "memory", folder=None, fingerprint: str = "",
                max_memory_bytes: float = float("inf"), bar: bool = False, log=None) -> str:
        """Encode every distinct prompt of ``prompts`` once, ``batch_size`` at a time, into a row store
        (``mode``: memory, disk or auto, :func:`fewstep.cache.resolve_mode`); a complete disk cache in ``folder``
        with this ``fingerprint`` is reused instead.  Returns where the rows are: ``memory``, ``disk`` or ``reused``."""
        from tqdm.auto import tqdm

        from . import cache

        distinct = list(dict.fromkeys(prompts))
        store = cache.open_rows(folder, fingerprint) if folder is not None and mode != "memory" else None
        if store is not None and len(store) == len(distinct):
            self.store, self._rows = store, {p: i for i, p in enumerate(distinct)}
            if log is not None:
                log(f"fewstep: reusing the {len(distinct)} prompt embeddings cached in {folder}")
            return "reused"
        if log is not None:
            log(f"fewstep: encoding {len(distinct)} prompts with the text encoders ...")
        t0 = time.time()
        extra: dict[str, Tensor] = {}

        def chunks():
            with tqdm(total=len(distinct), desc="encoding prompts", unit="prompt", disable=not bar,
                      dynamic_ncols=True) as pb:
                for i in range(0, len(distinct), self._batch):
                    part = distinct[i:i + self._batch]
                    with torch.no_grad():
                        enc = self._encode(part).to("cpu")
                    row = {}
                    for f in fields(enc):
                        v = getattr(enc, f.name)
                        if v is None:
                            continue
                        if f.name in PROMPT_INDEPENDENT:
                            extra.setdefault(f.name, v[:1].clone())
                        else:
                            row[f.name] = v
                    pb.update(len(part))
                    yield row

        self.store = cache.build_rows(len(distinct), chunks(), mode, folder, fingerprint, max_memory_bytes,
                                      what="prompt cache", meta={"what": "prompt embeddings"}, extra=extra)
        self._rows = {p: i for i, p in enumerate(distinct)}
        if log is not None:
            log(f"fewstep: encoded {len(distinct)} prompts in {time.time() - t0:.1f} s "
                f"({'in memory' if self.store.kind == 'memory' else f'cached in {folder}'})")
        return self.store.kind

    def _from_store(self, prompts: Sequence[str]) -> Condition:
        rows = self.store.rows([self._rows[p] for p in prompts])
        n = len(prompts)
        rows.update({k: v.expand(n, *v.shape[1:]).clone() for k, v in self.store.extra.items()})
        return Condition(**rows)

    def get(self, prompts: Sequence[str]) -> Condition:
        if self._rows is not None:
            hit = [p in self._rows for p in prompts]
            if all(hit):
                return self._from_store(prompts)
            self.warm([p for p, h in zip(prompts, hit) if not h])
            return Condition.cat([self._from_store([p]) if h else self._cache[p] for p, h in zip(prompts, hit)])
        self.warm(prompts)
        return Condition.cat([self._cache[p] for p in prompts])
