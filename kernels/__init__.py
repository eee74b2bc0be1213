"""Fused Triton kernels for Monarch matrices and the gated FFT convolution, with PyTorch reference paths.

Installed as `m2train.kernels`. Until the kernels land, the models run their PyTorch paths
(m2train.models.blockdiag / monarch / longconv), which are also the references the kernels are tested
against."""
