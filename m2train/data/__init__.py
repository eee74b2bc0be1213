"""Streaming datasets and loaders over prepared MDS shards (GPT packed windows, BERT masked LM)."""
