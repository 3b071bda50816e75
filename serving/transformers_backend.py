"""transformers backend: a merged checkpoint, or a base model + a PEFT LoRA adapter.

Plain transformers on CPU; on CUDA Unsloth's fast inference when Unsloth is installed (the
serve-unsloth image), plain transformers otherwise. Each request generates in its own thread
(``model.generate`` with a streamer that hands token ids to the event loop); at most ``parallel``
run at once and the API answers 429 beyond its queue. torch/transformers are imported only here,
only when this backend starts, so the llama.cpp image does not need them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import anyio

from gptoss.serving.backends import Backend, BackendConfig, BackendError, Generated, SamplingParams, ServeError, register_backend

log = logging.getLogger("gptoss.serve.transformers")


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

    async def start(self) -> None:
        await asyncio.to_thread(self._load)
        self.ready = True

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
        return {**super().info(), "engine": self.engine}


    async def stop(self) -> None:
        self.ready = False
        self.model = None

    async def generate(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[Generated]:
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
                            prompt_text=harmony.encoding().decode_utf8(input_ids[0].tolist()), n_generated=len(produced))
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
