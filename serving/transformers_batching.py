"""Continuous batching for the transformers backend: transformers' own ``ContinuousBatchingManager``.

One manager (one generation thread, one paged KV cache) serves every request; each step batches
all running requests. Imported only when the backend starts (it imports torch and transformers).

What we add on top of transformers' manager, and why:
- Attention: ``paged|eager`` always (``auto_switch_to_flash=False``). It handles gpt-oss's attention
  sinks and sliding-window layers; the flash paths drop the sinks unless the kernel takes ``s_aux``.
- Sampling (``PerRequestSampler``): the manager's ``do_sample`` and seed are global, so it runs
  greedy (argmax) and this logits processor does each request's own sampling: greedy rows pass
  untouched (argmax = plain ``generate``'s greedy); a sampled row gets its temperature and top_p,
  then one token drawn by inverse CDF from a uniform number of the request's own seeded generator
  (drawn on the host before the step), and every other token set to -inf. So a seed reproduces a
  request whatever else runs beside it; the draws are not those of ``generate(do_sample=True)``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import threading
import uuid
from collections import Counter

import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching.cb_logits_processors import ContinuousBatchingLogitsProcessorList
from transformers.generation.logits_process import LogitsProcessorList

log = logging.getLogger("gptoss.serve.transformers")

PAGE_TOKENS = 256  # transformers' default page size, for sizing the cache in whole pages


@dataclasses.dataclass
class _Sampling:
    temperature: float  # <= 0: greedy
    top_p: float
    rng: torch.Generator


class PerRequestSampler(ContinuousBatchingLogitsProcessorList):
    """Per-request temperature, top_p and seed inside one continuous batch (see the module docstring).

    Three int32 rows of the manager's argument tensor: temperature, top_p and the uniform draw
    (float32 viewed as int32), one column per request that gets a token this step."""

    def __init__(self):
        super().__init__(LogitsProcessorList())
        self.tensors_required = 3
        self.do_processing = True
        self.requests: dict[str, _Sampling] = {}
        self.batch_sizes: Counter[int] = Counter()  # requests given a token in one step -> steps
        self.stats_lock = threading.Lock()  # batch_sizes grows in the generation thread, /info reads it
        # Set on the host before each step; read by __call__ of that step. Valid because the manager runs
        # without CUDA graphs and without async batching here (paged|eager needs a mask: both default off).
        self._any_sampled = False

    def add(self, request_id: str, *, temperature: float, top_p: float, seed: int | None) -> None:
        rng = torch.Generator()
        rng.manual_seed(seed if seed is not None else random.getrandbits(63))
        self.requests[request_id] = _Sampling(temperature, top_p, rng)

    def forget(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def check_kwargs(self, kwargs: dict) -> None:  # we pass no per-request kwargs through the manager
        if kwargs:
            raise ValueError(f"unexpected logits-processor kwargs {sorted(kwargs)}")

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.zero_()  # temperature 0: greedy

    def prepare_tensor_args(self, requests_in_batch, arg_storage: torch.Tensor) -> torch.Tensor:
        rows = [r for r in requests_in_batch if r.has_new_token]
        columns = []  # (temperature, top_p, uniform) per row
        for r in rows:
            s = self.requests.get(r.state.request_id)
            if s is None or s.temperature <= 0:  # greedy (or a warm-up state)
                columns.append((0.0, 1.0, 0.0))
            else:
                columns.append((s.temperature, s.top_p, float(torch.rand((), generator=s.rng))))
        self._any_sampled = any(c[0] > 0 for c in columns)
        if rows:
            with self.stats_lock:
                self.batch_sizes[len(rows)] += 1
            values = torch.tensor(columns, dtype=torch.float32).T.contiguous().view(torch.int32)
            arg_storage[:3, : len(rows)] = values.to(arg_storage.device)
        return arg_storage

    def __call__(self, input_ids, scores: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
        if not self._any_sampled:  # an all-greedy step: argmax of the raw scores
            return scores
        n = scores.size(0)
        values = args[:3, :n].view(torch.float32)
        temperature, top_p, uniform = values[0], values[1], values[2]
        greedy = temperature <= 0
        scaled = scores / torch.where(greedy, torch.ones_like(temperature), temperature).unsqueeze(-1)
        sorted_scores, order = torch.sort(scaled, dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs
        keep = before < top_p.unsqueeze(-1)  # top_p: the smallest head whose mass reaches top_p
        keep[:, 0] = True  # the most likely token always stays (a top_p that rounds to 0 in float32)
        probs = probs * keep
        cdf = probs.cumsum(dim=-1)
        target = (uniform * cdf[:, -1]).unsqueeze(-1)
        index = (cdf <= target).sum(dim=-1, keepdim=True)
        index = torch.minimum(index, keep.sum(dim=-1, keepdim=True) - 1)  # never past the kept head
        chosen = order.gather(-1, index)
        picked = torch.full_like(scores, float("-inf")).scatter(-1, chosen, 0.0)
        return torch.where(greedy.unsqueeze(-1), scores, picked)


class ContinuousBatcher:
    """One ContinuousBatchingManager for the server: submit, stream, cancel; stats for /info."""

    def __init__(self, model, *, parallel: int, ctx: int):
        self.parallel, self.ctx = parallel, ctx
        pages = -(-ctx // PAGE_TOKENS) + 1  # a request's longest context, in pages (+1: a partly filled one)
        config = ContinuousBatchingConfig(
            num_blocks=parallel * pages,  # every slot's whole context fits: nothing is ever offloaded
            max_batch_tokens=min(2048, max(256, ctx)),  # longer prompts are prefilled in chunks
            max_requests_per_batch=parallel,
            auto_switch_to_flash=False,
            scheduler_type="fifo",
        )
        generation = GenerationConfig(do_sample=False, max_new_tokens=ctx, eos_token_id=-1)
        self.sampler = PerRequestSampler()
        self.manager = model.init_continuous_batching(generation_config=generation, continuous_batching_config=config)
        self.manager.logit_processor = self.sampler  # before start(): the batch processor is built from it
        self.attention = model.config._attn_implementation
        with torch.inference_mode():  # the generation thread runs in the mode it was started in
            self.manager.start()

    def alive(self) -> bool:
        return self.manager.is_running() and self.manager.background_thread_status.fatal_error is None

    def submit(self, prompt: list[int], *, max_tokens: int, stop_token_ids: list[int], temperature: float, top_p: float,
               seed: int | None) -> tuple[str, asyncio.Queue]:
        """Add a request; its GenerationOutputs (all tokens so far, each time) arrive on the returned queue."""
        request_id = "gptoss-" + uuid.uuid4().hex
        queue: asyncio.Queue = asyncio.Queue()
        self.sampler.add(request_id, temperature=temperature, top_p=top_p, seed=seed)
        self.manager.register_result_handler(request_id, queue.put_nowait)
        added = self.manager.add_request(prompt, request_id=request_id, max_new_tokens=max_tokens, streaming=True,
                                         eos_token_id=list(stop_token_ids) or [-1])
        if added is None:
            self.release(request_id)
            raise RuntimeError("the continuous-batching manager refused the request (it is stopping)")
        return request_id, queue

    def release(self, request_id: str, *, cancel: bool = False) -> None:
        """Done with a request: cancel it in the engine (frees its KV pages) when it has not finished."""
        router = self.manager.output_router
        with router._lock:
            router.result_handlers.pop(request_id, None)
        if cancel:
            self.manager.cancel_request(request_id)
        self.sampler.forget(request_id)
        # Outputs of a cancelled request that were already under way land on the shared queue: drop them.
        while not router.output_queue.empty():
            try:
                router.output_queue.get_nowait()
            except Exception:  # queue.Empty between the check and the get
                break

    def stats(self) -> dict:
        processor = self.manager.batch_processor
        scheduler = getattr(processor, "scheduler", None)
        with self.sampler.stats_lock:
            sizes = dict(self.sampler.batch_sizes)
        return {"mode": "continuous", "attention": self.attention, "max_requests_per_batch": self.parallel,
                "active": len(scheduler.active_requests) + len(scheduler.waiting_requests) if scheduler else 0,
                "steps": sum(sizes.values()), "max_batch": max(sizes, default=0),
                "batch_sizes": {str(k): v for k, v in sorted(sizes.items())}}

    def stop(self) -> None:
        self.manager.stop(block=True, timeout=30)
