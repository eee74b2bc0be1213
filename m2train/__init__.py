"""m2train: distributed pretraining of Monarch Mixer (M2) language models."""

__version__ = "0.1.0"
