"""A character-level tokenizer built locally with `tokenizers`, wrapped as a transformers fast
tokenizer so the rest of the code treats it like any Hugging Face tokenizer.

`</thought>`, `\\boxed{` and `Step` are single tokens; every printable ASCII character, newline
and tab have their own id, so any text (stop strings, letters) round-trips.
"""

from __future__ import annotations

import string

MULTI_CHAR_TOKENS = ("</thought>", "\\boxed{", "Step")
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
CHARS = tuple(string.digits + "+-*=:|{}<>\\/ \n\t" + string.ascii_letters + "!\"#$%&'().;?@[]^_`~,")


def vocabulary() -> list[str]:
    chars = [c for i, c in enumerate(CHARS) if c not in CHARS[:i] and c.isascii()]
    return list(SPECIAL_TOKENS.values()) + list(MULTI_CHAR_TOKENS) + chars


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_tokens(list(MULTI_CHAR_TOKENS))
    tok.add_special_tokens(list(SPECIAL_TOKENS.values()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **SPECIAL_TOKENS)
    fast.padding_side = "left"
    return fast
