"""transformers backend: a merged checkpoint, or a base model + a PEFT LoRA adapter.

Plain transformers on CPU; on CUDA Unsloth's fast inference when Unsloth is installed (the
serve-unsloth image), plain transformers otherwise. Requests are batched continuously by
transformers' own ContinuousBatchingManager with paged attention (serving.transformers_batching):
one generation thread, every running request in each step, up to ``parallel`` at once (the API
answers 429 beyond its queue). Where that cannot run (a transformers without it, or a model whose
forward rejects paged attention, e.g. one patched by Unsloth: a 2-token probe at start finds out),
each request generates in its own thread (``model.generate`` with a streamer) as before; the log
and /info (``batching``) say which path serves. torch/transformers are imported only here, only
when this backend starts, so the llama.cpp image does not need them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import anyio

from gptoss.serving.backends import (Backend, BackendConfig, BackendError, EngineDown, Generated, SamplingParams, ServeError,
                                     register_backend)

log = logging.getLogger("gptoss.serve.transformers")

ENGINE_CHECK_S = 5.0  # a request that hears nothing this long checks the batching engine is alive
SUPERVISE_POLL_S = 1.0  # how often supervise() looks at the batching loop


class _TokenQueue:
    """A transformers streamer: ``put`` (generation thread) -> asyncio queue (event loop)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt
            self._prompt_seen = True
            return
        ids = [int(t) for t in value.reshape(-1).tolist()]
        self.loop.call_soon_threadsafe(self.queue.put_nowait, ids)

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)

    def fail(self, error: BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, error)


@register_backend("transformers")
class TransformersBackend(Backend):
    """``--model`` a merged checkpoint dir (or the base of ``--adapter``), ``--adapter`` a PEFT LoRA dir."""

    def __init__(self, config: BackendConfig):
        super().__init__(config)
        model = Path(config.model)
        if model.exists() and not (model / "config.json").is_file():
            raise ServeError(f"--model {config.model}: not a checkpoint directory (no config.json); pass a merged dir or the base model dir")
        if config.adapter and not (Path(config.adapter) / "adapter_config.json").is_file():
            raise ServeError(f"--adapter {config.adapter}: no adapter_config.json; pass the adapter dir written by `gptoss train`")
        self.split_4bit = _is_split_4bit(config.model)
        if self.split_4bit and config.gpu_index is None:
            run = str(Path(config.adapter).parent) if config.adapter else "models/<run>"
            raise ServeError(
                f"{config.model} is Unsloth's split bnb-4bit checkpoint (per-expert NF4 Linears): only Unsloth on CUDA "
                f"loads it with its adapter; on this CPU serve the merged model instead: `gptoss export --run {run}` "
                f"(or `gptoss merge --run {run}`), then `gptoss serve --backend transformers --model exports/<run>`"
            )
        self.model = None
        self.engine = "transformers"
        self.batcher = None  # serving.transformers_batching.ContinuousBatcher once it runs
        self.batching_note = "not started"  # why the thread-per-request path serves, when it does

    async def start(self) -> None:
        await asyncio.to_thread(self._load)
        await self._start_batching()
        self.ready = True

    async def _start_batching(self) -> None:
        """Continuous batching when it runs here (a 2-token probe through it); else the thread path."""
        if not hasattr(self.model, "init_continuous_batching"):
            self._thread_path("this transformers has no continuous batching (init_continuous_batching)")
            return
        attention = self.model.config._attn_implementation  # the manager switches it to paged|eager
        try:
            from gptoss.serving.transformers_batching import ContinuousBatcher

            self.batcher = await asyncio.to_thread(ContinuousBatcher, self.model, parallel=self.parallel, ctx=self.n_ctx)
            from gptoss import harmony

            prompt = harmony.render_prompt([{"role": "user", "content": "Hello"}])
            probe = [t async for step in self._generate_batched(prompt, SamplingParams(max_tokens=2, temperature=0.0))
                     for t in step.tokens]
            if not probe:
                raise BackendError("the probe request generated no token")
        except Exception as e:  # ImportError (an older transformers) or a forward that rejects paged attention
            if self.batcher is not None:
                await asyncio.to_thread(self.batcher.stop)  # also gives the model its attention back
                self.batcher = None
            if self.model.config._attn_implementation != attention:
                self.model.set_attn_implementation(attention)
            self._thread_path(f"continuous batching failed its probe: {type(e).__name__}: {e}")
            return
        log.info("transformers backend (%s): continuous batching, %s attention, up to %d requests per step",
                 self.engine, self.batcher.attention, self.parallel)

    async def supervise(self) -> None:
        """Continuous batching: a generation loop that died (an error inside a step stops it) starts again."""
        from gptoss.serving.transformers_batching import ContinuousBatcher

        while self.batcher is not None:
            await asyncio.sleep(SUPERVISE_POLL_S)
            dead = self.batcher
            if dead.alive():
                continue
            error = dead.manager.background_thread_status.fatal_error
            log.error("the continuous-batching loop stopped (%r); starting a new one", error)
            self.unavailable = f"the batching engine stopped ({error!r}); it is being restarted"
            await asyncio.to_thread(dead.stop)
            self.batcher = await asyncio.to_thread(ContinuousBatcher, self.model, parallel=self.parallel, ctx=self.n_ctx)
            self.unavailable = None

    def _thread_path(self, why: str) -> None:
        self.batching_note = why
        log.warning("transformers backend (%s): one generate thread per request, no batching across requests (%s)",
                    self.engine, why)

    def _load(self) -> None:
        import torch

        cfg = self.config
        cuda = cfg.gpu_index is not None
        if cuda and not torch.cuda.is_available():
            raise ServeError(f"--device {cfg.device}: CUDA is not available here; use --device cpu")
        device = torch.device(cfg.device)
        dtype = {"auto": torch.bfloat16 if cuda else torch.float32, "bfloat16": torch.bfloat16,
                 "float32": torch.float32, "float16": torch.float16}[cfg.dtype]
        if cfg.threads and not cuda:
            torch.set_num_threads(cfg.threads)
        if cuda:
            try:
                model = self._load_unsloth(dtype)
                self.engine = "unsloth"
            except ImportError:
                if self.split_4bit:
                    raise ServeError(f"--model {cfg.model} is Unsloth's split bnb-4bit checkpoint: it needs unsloth "
                                     "(the serve-unsloth image, or pip install 'gptoss-toolchain[unsloth]'), or serve "
                                     "the merged model (gptoss merge --run models/<run>)") from None
                log.warning("unsloth is not installed; serving with plain transformers on %s", cfg.device)
                model = self._load_transformers(dtype, device)
        else:
            model = self._load_transformers(dtype, device)
        model.eval()
        self.model = model
        self.device = device
        max_pos = getattr(model.config, "max_position_embeddings", None)
        if max_pos and self.n_ctx > max_pos:
            raise ServeError(f"--ctx {self.n_ctx} exceeds the model's max_position_embeddings {max_pos}")

    def _load_transformers(self, dtype, device):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.config.model, dtype=dtype, revision=self.config.revision).to(device)
        if self.config.adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, self.config.adapter)
        return model

    def _load_unsloth(self, dtype):  # CUDA only; cannot run on the CPU test machine
        from unsloth import FastLanguageModel  # raises ImportError without the serve-unsloth image

        model, _ = FastLanguageModel.from_pretrained(
            model_name=self.config.model, max_seq_length=self.config.ctx, dtype=dtype, load_in_4bit=self.split_4bit,
            device_map={"": self.config.gpu_index}, revision=self.config.revision,
        )
        if self.config.adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, self.config.adapter)
        FastLanguageModel.for_inference(model)
        return model

    def info(self) -> dict:
        batching = self.batcher.stats() if self.batcher else {"mode": "thread", "reason": self.batching_note}
        return {**super().info(), "engine": self.engine, "batching": batching}

    def alive(self) -> bool:
        return self.batcher.alive() if self.batcher else True

    async def stop(self) -> None:
        self.ready = False
        if self.batcher is not None:
            await asyncio.to_thread(self.batcher.stop)
            self.batcher = None
        self.model = None

    def generate(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[Generated]:
        if self.batcher is not None:
            return self._generate_batched(prompt, params)
        return self._generate_in_thread(prompt, params)

    async def _generate_batched(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[Generated]:
        """One request in the continuous batch: the engine streams all its tokens so far at each step."""
        from gptoss import harmony

        batcher = self.batcher
        stops = set(params.stop_token_ids)
        try:
            request_id, outputs = batcher.submit(prompt, max_tokens=params.max_tokens, stop_token_ids=sorted(stops),
                                                 temperature=params.temperature, top_p=params.top_p, seed=params.seed)
        except RuntimeError as e:  # the manager is stopping (supervise() is replacing it)
            raise EngineDown(str(e)) from e
        produced: list[int] = []
        finished = False
        try:
            while not finished:
                try:
                    out = await asyncio.wait_for(outputs.get(), ENGINE_CHECK_S)
                except asyncio.TimeoutError:  # nothing for a while: is the engine still there?
                    if not batcher.alive():
                        raise EngineDown("the continuous-batching engine stopped; it is being restarted") from None
                    continue
                if out.error is not None:
                    raise BackendError(out.error)
                finished = out.is_finished()
                new = out.generated_tokens[len(produced):]
                if new:
                    produced.extend(new)
                    yield Generated(tokens=list(new))
            reason = "stop" if produced and produced[-1] in stops else "length"
            yield Generated(tokens=[], done=True, reason=reason, prompt_text=harmony.encoding().decode(prompt),
                            n_generated=len(produced))
        finally:
            batcher.release(request_id, cancel=not finished)  # client gone: the engine frees its slot and pages

    async def _generate_in_thread(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[Generated]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        from gptoss import harmony

        cancelled = threading.Event()

        class _Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancelled.is_set(), dtype=torch.bool, device=input_ids.device)

        loop = asyncio.get_running_loop()
        streamer = _TokenQueue(loop)
        input_ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
        kwargs = dict(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=params.max_tokens,
            eos_token_id=list(params.stop_token_ids),
            pad_token_id=harmony.token_id(harmony.ENDOFTEXT),
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList([_Cancelled()]),
        )
        if params.temperature > 0:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)

        def run() -> None:
            try:
                if params.seed is not None:
                    # One global RNG: a seed makes a request reproducible when it runs alone.
                    torch.manual_seed(params.seed)
                with torch.inference_mode():
                    self.model.generate(**kwargs)
            except BaseException as e:  # hand every failure to the event loop
                streamer.fail(e)
            else:
                streamer.end()

        thread = threading.Thread(target=run, name="gptoss-generate", daemon=True)
        thread.start()
        produced: list[int] = []
        stops = set(params.stop_token_ids)
        try:
            while True:
                item = await streamer.queue.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise BackendError(f"generation failed: {item!r}") from item
                produced.extend(item)
                yield Generated(tokens=item)
            reason = "stop" if produced and produced[-1] in stops else "length"
            yield Generated(tokens=[], done=True, reason=reason,
                            prompt_text=harmony.encoding().decode(input_ids[0].tolist()), n_generated=len(produced))
        finally:
            cancelled.set()  # client gone or done: stop the generation thread at its next step
            with anyio.CancelScope(shield=True):  # hold the slot until the thread has really stopped
                await asyncio.to_thread(thread.join)


def _is_split_4bit(model: str) -> bool:
    """Unsloth's split bnb-4bit layout (a local folder, or a Hub id in the cache or known by name)."""
    from gptoss import layouts

    path = Path(model).expanduser()
    if not path.is_dir():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "config.json")
        except Exception:  # not a valid repo id: nothing cached under it
            cached = None
        if not isinstance(cached, str):
            return model in layouts.SIXTEEN_BIT_ORIGINALS
        path = Path(cached).parent
    return layouts.describe(path)["layout"] == layouts.SPLIT
