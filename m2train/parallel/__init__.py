"""Applies parallelism to a built model (tensor/context parallel -> activation checkpointing -> engine)."""
