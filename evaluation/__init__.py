"""`gptoss eval` (did the fine-tune help, did quantizing cost quality?) and `gptoss bench` (how fast is it
served?). Modules: eval (held-out loss per artifact, generation checks, lm-eval harness), bench (speed of
an OpenAI-compatible server), chart (the PNG charts of both)."""
