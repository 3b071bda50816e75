"""Smoke check of a gpt-oss checkpoint on CPU: Harmony prompt in, a few tokens out, parsed back.

    python3 -m gptoss.smoke models/tiny
"""

from __future__ import annotations

import sys

from gptoss import harmony


def smoke(model_dir: str, *, max_new_tokens: int = 8, seed: int = 0) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    messages = [{"role": "user", "content": "Say hello in French."}]
    prompt = harmony.render_prompt(messages, options=harmony.SystemOptions(reasoning_effort="low"))
    template_ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, reasoning_effort="low", return_dict=False
    )
    if list(template_ids) != prompt:
        raise SystemExit("the checkpoint's chat template disagrees with the Harmony core")
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=harmony.stop_token_ids(), pad_token_id=tokenizer.pad_token_id,
        )
    new_tokens = out[0, len(prompt):].tolist()
    parsed = harmony.parse_completion(new_tokens)
    return {
        "prompt_tokens": len(prompt),
        "new_tokens": new_tokens,
        "parsed_messages": len(parsed.messages),
        "parse_errors": len(parsed.errors),
    }


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python3 -m gptoss.smoke MODEL_DIR", file=sys.stderr)
        return 2
    report = smoke(argv[0])
    print(f"ok: prompt {report['prompt_tokens']} tokens (chat template == Harmony core), "
          f"generated {len(report['new_tokens'])} tokens: {report['new_tokens']}; "
          f"random weights, so the parser reported {report['parse_errors']} error(s) and never raised")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
