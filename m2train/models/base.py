"""What every m2train model shares: config, init_weights() and optimizer parameter groups."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..config import ModelConfig, OptimConfig
from .filter import ImplicitFilter, Sin, positional_features


def kernel_mode(module: nn.Module) -> str:
    """The configured compute-kernel mode of a layer that has a fused Triton kernel: "auto" | "triton" |
    "torch" (ModelConfig.kernels; m2train.kernels.dispatch.use_triton applies it, and M2TRAIN_KERNELS
    overrides it at call time).

    The mechanism, for every layer with a kernel: declare a class attribute `kernels = "auto"` and call
    `use_triton(x, kernel_mode(self))` in forward. Every model's init_weights() (run at the end of its
    __init__) stores config.kernels on each such submodule (`set_kernel_mode`); a layer built on its own
    keeps "auto"."""
    return getattr(module, "kernels", "auto")


def set_kernel_mode(model: nn.Module, mode: str) -> None:
    """Store `mode` on every submodule whose class declares a `kernels` attribute (see kernel_mode)."""
    for module in model.modules():
        if isinstance(getattr(type(module), "kernels", None), str):
            module.kernels = mode


class M2TrainModel(nn.Module):
    """Base class. Subclasses build their modules and call `init_weights()` at the end of __init__."""

    config: ModelConfig

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter and buffer, so a model built on the meta device and then
        materialised gets the same distribution as one built directly.

        Dense Linear / Embedding ~ N(0, initializer_range), biases 0, LayerNorm 1/0 (BERT recipe);
        structured layers, short convs, D skips and filter frequencies keep their own reference inits."""
        # Not a weight, but this is the one hook every model runs at the end of construction.
        set_kernel_mode(self, self.config.kernels)
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
                if module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, nn.LayerNorm):
                if module.weight is not None:
                    nn.init.ones_(module.weight)
                    nn.init.zeros_(module.bias)
            elif isinstance(module, Sin):
                module.freq.fill_(self.config.filter_sin_freq)
            elif isinstance(module, ImplicitFilter):
                z, t = positional_features(module.max_len, module.z.shape[-1])
                module.z.copy_(z)
                module.t.copy_(t)
            elif hasattr(module, "reset_parameters") and not isinstance(module, (nn.Linear, nn.Embedding)):
                module.reset_parameters()
            if hasattr(module, "skip") and isinstance(module.skip, nn.Parameter):
                nn.init.normal_(module.skip)
        self._init_extra()

    def _init_extra(self) -> None:
        """Hook for model-specific init (e.g. GPT-2 style scaled residual projections)."""

    # ------------------------------------------------------------------------------------------
    def param_groups(self, optim: OptimConfig) -> list[dict]:
        """Split parameters into optimizer groups (each dict has name, params, lr, weight_decay).

        - "filter": forward implicit-filter MLPs and the shared Sin frequency (reference lr 1e-3, wd 0.1;
          the reverse MLP is NOT in this group, as in the reference)
        - "pos_emb": the filters' positional features z (lr 1e-5, no decay)
        - "monarch_basis": nodes and levels of a learned causal Monarch mixer (never decayed)
        - "no_decay": biases, LayerNorm parameters, D skips (as configured)
        - "default": everything else."""
        norm_params = {id(p) for m in self.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
        groups: dict[str, list] = {"default": [], "no_decay": [], "filter": [], "pos_emb": [],
                                   "monarch_basis": []}
        seen: set[int] = set()
        for name, p in self.named_parameters():
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            if ".monarch." in name:
                groups["monarch_basis"].append(p)
            elif name.endswith("filter.z"):
                groups["pos_emb"].append(p)
            elif ".filter.mlp." in name or name.endswith("filter.sin.freq"):
                groups["filter"].append(p)
            elif optim.no_decay_bias_and_norm and (id(p) in norm_params or name.endswith("bias")):
                groups["no_decay"].append(p)
            elif optim.no_decay_skip and name.endswith(".skip"):
                groups["no_decay"].append(p)
            else:
                groups["default"].append(p)
        settings = {
            "default": (optim.lr, optim.weight_decay),
            "no_decay": (optim.lr, 0.0),
            "filter": (optim.filter_lr if optim.filter_lr is not None else optim.lr, optim.filter_weight_decay),
            "pos_emb": (optim.pos_emb_lr, optim.pos_emb_weight_decay),
            "monarch_basis": (optim.monarch_basis_lr or optim.lr, 0.0),
        }
        return [{"name": k, "params": v, "lr": settings[k][0], "weight_decay": settings[k][1]}
                for k, v in groups.items() if v]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def scaled_residual_init(projections: list[nn.Module], std: float, num_layers: int) -> None:
    """GPT-2: scale the init of layers that write into the residual stream by 1/sqrt(2·layers)."""
    scale = std / math.sqrt(2 * num_layers)
    with torch.no_grad():
        for m in projections:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, scale)
