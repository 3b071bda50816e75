"""Test support for the serving tests: a tiny gpt-oss taught to answer in Harmony form.

Random tiny weights emit garbage, so the live-server tests use a tiny fixture with a LoRA adapter
trained (plain PyTorch + PEFT, a few dozen steps on CPU) on three Harmony conversations: a greeting
with analysis and a final answer, a tool call to ``functions.get_weather`` and the answer after the
tool result. The adapter serves the transformers backend (base + adapter); merged into the base it
is converted to an F16 GGUF for the llama.cpp backend. Everything goes through gptoss.harmony.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from gptoss import harmony
from gptoss.machine import stop_process

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
GREETING = [{"role": "user", "content": "Say hello."}]
GREETING_REASONING = "The user greets me. I will greet back."
GREETING_ANSWER = "Hello! How can I help you today?"
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_REASONING = "I need the weather tool."
WEATHER_ARGUMENTS = '{"city": "Paris"}'
WEATHER_RESULT = '{"temperature_c": 21, "sky": "sunny"}'
WEATHER_ANSWER = "It is sunny and 21 degrees in Paris."


def weather_call(call_id: str = "call_1") -> dict:
    return {
        "role": "assistant",
        "reasoning_content": WEATHER_REASONING,
        "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": WEATHER_ARGUMENTS}}
        ],
    }


def weather_result(call_id: str = "call_1") -> dict:
    return {"role": "tool", "tool_call_id": call_id, "content": WEATHER_RESULT}


def conversations() -> list[tuple[list[dict], dict, list[dict] | None]]:
    """(prompt messages, assistant turn to learn, tools)."""
    return [
        (GREETING, {"role": "assistant", "reasoning_content": GREETING_REASONING, "content": GREETING_ANSWER}, None),
        (WEATHER_QUESTION, weather_call(), [WEATHER_TOOL]),
        (WEATHER_QUESTION + [weather_call(), weather_result()], {"role": "assistant", "content": WEATHER_ANSWER}, [WEATHER_TOOL]),
    ]


def training_examples() -> list[tuple[list[int], int]]:
    """(token ids, prompt length) for every conversation at every reasoning effort."""
    out = []
    for prompt, answer, tools in conversations():
        for effort in harmony.REASONING_EFFORTS:
            options = harmony.SystemOptions(reasoning_effort=effort)
            ids = harmony.render_training(prompt + [answer], tools=tools, options=options)
            n_prompt = len(harmony.render_prompt(prompt, tools=tools, options=options))
            assert ids[-1] in harmony.stop_token_ids()
            out.append((ids, n_prompt))
    return out


def train_adapter(base_dir: str | Path, adapter_dir: str | Path, *, steps: int = 60, lr: float = 3e-3, seed: int = 0, log=None) -> float:
    """Train a LoRA adapter on the completions of ``training_examples()``; returns the last loss."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    config = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "lm_head"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    model = get_peft_model(model, config)
    examples = training_examples()
    width = max(len(ids) for ids, _ in examples)
    pad = harmony.token_id(harmony.ENDOFTEXT)
    input_ids = torch.full((len(examples), width), pad, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
        mask[row, : len(ids)] = 1
    # Logits only where there is a label: the 201k-wide lm_head over every position dominates the cost.
    targets = labels[:, 1:]
    where = targets != -100
    inner = model.get_base_model().model
    lm_head = model.get_base_model().lm_head
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    model.train()
    loss_value = float("nan")
    for step in range(steps):
        hidden = inner(input_ids=input_ids, attention_mask=mask).last_hidden_state[:, :-1]
        loss = torch.nn.functional.cross_entropy(lm_head(hidden[where]).float(), targets[where])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        loss_value = loss.item()
        if log:
            log(step, loss_value)
    model.save_pretrained(str(adapter_dir), save_embedding_layers=False)
    return loss_value


def merge_adapter(base_dir: str | Path, adapter_dir: str | Path, merged_dir: str | Path) -> None:
    """base + adapter -> a bf16 checkpoint with the tokenizer (what the export stage does, minimally)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    model = model.to(torch.bfloat16)
    model.save_pretrained(str(merged_dir))
    AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(str(merged_dir))


def convert_to_gguf(model_dir: str | Path, gguf_path: str | Path) -> None:
    """F16 GGUF with the pinned llama.cpp converter."""
    from gptoss import llamacpp

    script, env = llamacpp.converter()
    subprocess.run(
        [sys.executable, str(script), str(model_dir), "--outfile", str(gguf_path), "--outtype", "f16"],
        env=env, check=True, capture_output=True,
    )


def build_harmony_models(base_dir: str | Path, out: Path) -> dict[str, Path]:
    """adapter/, merged/ and merged-f16.gguf under ``out`` (reused when ``out/.complete`` exists)."""
    paths = {"adapter": out / "adapter", "merged": out / "merged", "gguf": out / "merged-f16.gguf"}
    if (out / ".complete").is_file():
        return paths
    import shutil

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    train_adapter(base_dir, paths["adapter"])
    merge_adapter(base_dir, paths["adapter"], paths["merged"])
    convert_to_gguf(paths["merged"], paths["gguf"])
    (out / ".complete").write_text("ok\n")
    return paths


def source_key() -> str:
    """Changes whenever the training recipe or the Harmony rendering changes."""
    import hashlib

    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(Path(harmony.__file__).read_bytes())
    return h.hexdigest()[:16]


class LiveServer:
    """`python -m gptoss serve ...` as a child process on a free port, healthy before use.

    Its prompts carry no ``Current date:`` line ($GPTOSS_CURRENT_DATE=none): the fixture was trained
    without one, and a date changes its answers. ``env`` overrides (e.g. ``{"GPTOSS_CURRENT_DATE": ""}``
    for the server's clock); a --current-date or --no-date flag wins over both."""

    def __init__(self, *args: str, log_path: Path, timeout: float = 300.0, env: dict[str, str] | None = None):
        import os
        import socket
        import time

        import httpx

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        root = Path(__file__).resolve().parent.parent
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])),
                   **{"GPTOSS_CURRENT_DATE": "none", **(env or {})})
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "gptoss", "serve", "--port", str(self.port), *args],
                                     env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gptoss serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"gptoss serve not healthy after {timeout}s:\n{self.log()}")
            time.sleep(0.2)  # polling a child process's health, not synchronising the test

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def close(self) -> None:
        stop_process(self.proc)
        self._log.close()


if __name__ == "__main__":  # python tests/serve_support.py BASE OUT_DIR
    print(json.dumps({k: str(v) for k, v in build_harmony_models(sys.argv[1], Path(sys.argv[2])).items()}))
