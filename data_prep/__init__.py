"""Tokenization jobs: raw text (C4, The PILE, jsonl, txt) -> tokenizer -> MDS shards.

Installed as `m2train.data_prep`."""
