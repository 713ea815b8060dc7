"""The embedded default: a tiny causal LM and tokenizer built offline from a config."""
