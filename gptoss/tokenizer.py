"""The real gpt-oss tokenizer as a transformers fast tokenizer, built offline.

o200k_base BPE (converted with transformers' own TikTokenConverter and tiktoken's split pattern)
plus the 1090 Harmony specials at ids 199998..201087, eos ``<|return|>``, pad ``<|endoftext|>``
and our Harmony chat template.
"""

from __future__ import annotations

import functools
from importlib import resources

from gptoss import harmony, vocab

CHAT_TEMPLATE_FILE = "harmony_chat_template.jinja"
EOS_TOKEN = harmony.RETURN
PAD_TOKEN = harmony.ENDOFTEXT
BOS_TOKEN = harmony.STARTOFTEXT


def chat_template() -> str:
    return resources.files("gptoss").joinpath("templates", CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")


@functools.lru_cache(maxsize=1)
def _backend_json() -> str:
    """tokenizers JSON of o200k_base + Harmony specials (cached: the merge extraction takes seconds)."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    specials = list(harmony.special_tokens().values())  # id order, 199998..201087
    converter = TikTokenConverter(
        vocab_file=str(vocab.o200k_path()), pattern=vocab.O200K_PATTERN, extra_special_tokens=specials
    )
    tok = converter.converted()
    if tok.get_vocab_size() != vocab.VOCAB_SIZE:
        raise vocab.VocabularyError(f"built a vocabulary of {tok.get_vocab_size()} tokens, expected {vocab.VOCAB_SIZE}")
    return tok.to_str()


def build_tokenizer():
    """A ``PreTrainedTokenizerFast`` equal to gpt-oss's: same ids as openai-harmony's encoder."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_backend_json())
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=131072,
    )
    tok.chat_template = chat_template()
    return tok
