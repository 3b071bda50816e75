"""Feeds the Harmony parser random and mangled token streams (run by tests/test_harmony_fuzz.py).

    python3 tests/harmony_fuzz.py N SEED   ->  prints "ok N" when no stream raised
"""

from __future__ import annotations

import random
import sys

from gptoss import harmony

SAMPLES = [
    "<|channel|>analysis<|message|>Let me think.<|end|><|start|>assistant<|channel|>final<|message|>Hello!<|return|>",
    " to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>{\"location\": \"Paris\"}<|call|>",
    "<|channel|>commentary<|message|>Checking…<|end|><|start|>assistant to=functions.x<|channel|>commentary json<|message|>{}<|call|>",
    "<|channel|>final<|message|>日本語 🎉 — done<|return|>",
]


def streams(n: int, seed: int):
    rng = random.Random(seed)
    enc = harmony.encoding()
    valid = [enc.encode(s, allowed_special="all") for s in SAMPLES]
    specials = list(harmony.special_tokens())[:20] + [harmony.token_id(t) for t in harmony.CONTROL_TOKENS]
    for i in range(n):
        kind = i % 5
        if kind == 0:  # uniform ids, some beyond the vocabulary
            yield [rng.randrange(0, harmony.LAST_SPECIAL_ID + 500) for _ in range(rng.randrange(0, 60))]
        elif kind == 1:  # control tokens only
            yield [rng.choice(specials) for _ in range(rng.randrange(0, 40))]
        else:  # a valid completion, mangled
            toks = list(rng.choice(valid))
            for _ in range(rng.randrange(1, 6)):
                op = rng.randrange(4)
                pos = rng.randrange(0, len(toks) + 1)
                if op == 0 and toks:
                    del toks[min(pos, len(toks) - 1)]
                elif op == 1:
                    toks.insert(pos, rng.choice(specials))
                elif op == 2:
                    toks = toks[:pos]  # truncated
                elif len(toks) > 1:
                    j = rng.randrange(len(toks))
                    toks[min(pos, len(toks) - 1)], toks[j] = toks[j], toks[min(pos, len(toks) - 1)]
            yield toks


def main(n: int, seed: int) -> int:
    for tokens in streams(n, seed):
        result = harmony.parse_completion(tokens)
        assert isinstance(result, harmony.ParseResult)
        assert len(result.unparsed_tokens) <= len(tokens)
        assert all(isinstance(m.content, str) for m in result.messages)
        _ = (result.final, result.reasoning, result.tool_calls)
    print(f"ok {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), int(sys.argv[2])))
