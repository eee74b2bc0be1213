"""Fused Triton kernels for Monarch matrices and the gated FFT convolution, with PyTorch reference paths.

Installed as `m2train.kernels`. The models call the kernels through one op API per family and fall back
to their own PyTorch paths (m2train.models.blockdiag / monarch / glu / longconv / mixer / short_conv), which
are also the references the kernels are tested against; dispatch.py holds the one rule (model.kernels,
M2TRAIN_KERNELS). Monarch family: ops.py (blockdiag_linear, monarch_linear, glu_blockdiag,
glu_mlp_inference) over blockdiag.py, monarch.py, glu.py, glu_mlp.py (the whole GLU MLP in one kernel, for
inference); autotune.py lists and AOT-compiles their GPU configs. Long convolution: fftconv.py (one program
per sequence; the autograd function and dispatch) and fftconv_long.py (three levels: single pass up to
R = 4 rows, two passes beyond), fft_monarch.py (the DFT factors and spectrum layout), shortconv.py, and
fftconv_front.py (the mixer's short conv computed inside the gated conv kernels' loads).
Nothing here imports Triton until a kernel is about to run."""
