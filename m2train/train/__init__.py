"""The training engine: `m2train train`, evaluation and export."""
