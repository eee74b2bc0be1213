"""Sharded checkpoints: DeepSpeed per-rank files + our client state + manifest; atomic `latest`."""
