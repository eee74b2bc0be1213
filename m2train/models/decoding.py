"""Incremental decoding for the causal LMs: each step feeds only the new tokens and reuses what earlier
positions left behind, so a generated token costs O(t) in the context length t instead of a whole forward
over the prefix (the M2 analogue of a transformer's KV cache).

What a layer keeps between steps (its cache):
- M2 mixer: the last K-1 columns of z = in_linear(u) (the causal short conv's receptive field) and the
  inputs of its long convolutions so far (v ⊙ x1 and, with the residual conv, u), written into buffers
  allocated once for the whole generation. A one-token step of an FFT long conv is its last output,
      y_t = Σ_{s≤t} k[t-s]·v_s + D·v_t,
  one dot product per channel over the history, with the filter taps computed once per generation: the
  implicit filter's tap at lag n does not depend on the length asked for (ImplicitFilter slices its learned
  positional features), so these taps are the ones a full forward of any length uses. Steps of several
  tokens (the prompt) run the conv module's own forward over the history and keep its last outputs; so does
  every step of the learned causal Monarch conv (model.sequence_mixer=monarch_causal), which is not a
  convolution but whose output at t depends only on inputs at positions ≤ t and on factors fixed by
  model.max_seq_len, so the prefix's outputs are the whole sequence's.
- Attention (the GPT baseline): keys and values.
Everything else in a block (norms, in/out projections, the GLU) is per position.

The histories are kept in fp32 (fp64 for an fp64 model) whatever the model's dtype, as the FFT path computes
its convolutions in fp32 under bf16 (m2train.models.longconv). Decoding is inference only: call it under
torch.no_grad() on a model in eval mode (m2train.models.generation does both).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .longconv import fft_dtype
from .mixer import LongConv, M2SequenceMixer


class DecodeLengthError(ValueError):
    """A step that would go past the length the decode state was made for."""


def check_room(length: int, new: int, max_len: int) -> None:
    """Refuse a step of `new` tokens after `length` that would not fit a state made for `max_len`."""
    if length + new > max_len:
        raise DecodeLengthError(f"decoding {new} more token(s) after {length} would exceed the decode state's "
                                f"max_len={max_len} (at most model.max_seq_len)")


@dataclass
class MixerCache:
    """What an M2 mixer keeps between decoding steps (see the module docstring)."""

    max_len: int
    z_tail: torch.Tensor | None        # (B, 3H, K-1) last inputs of the short conv; None when K = 1
    v: torch.Tensor                    # (H, B, max_len) long-conv inputs v ⊙ x1 (channel-major: one bmm per step)
    u: torch.Tensor | None             # (H, B, max_len) residual long-conv inputs; None without a residual conv
    reversed_taps: dict[str, torch.Tensor] = field(default_factory=dict)   # conv name -> (H, max_len), k[max_len-1-j]
    length: int = 0

    @staticmethod
    def new(mixer: M2SequenceMixer, batch: int, max_len: int, device, dtype: torch.dtype) -> "MixerCache":
        H, K = mixer.hidden_size, mixer.short_conv.kernel_size
        hist = fft_dtype(dtype)
        z_tail = torch.zeros(batch, 3 * H, K - 1, device=device, dtype=dtype) if K > 1 else None
        u = torch.zeros(H, batch, max_len, device=device, dtype=hist) if mixer.residual_conv is not None else None
        return MixerCache(max_len, z_tail, torch.zeros(H, batch, max_len, device=device, dtype=hist), u)


def mixer_step(mixer: M2SequenceMixer, u: torch.Tensor, cache: MixerCache) -> torch.Tensor:
    """The causal mixer's output (B, T, H) at the T positions that follow the cache's, for their inputs
    u (B, T, H); the cache then holds them too. Same math as M2SequenceMixer.forward without a pad mask."""
    if mixer.bidirectional:
        raise ValueError("incremental decoding needs a causal mixer; this one is bidirectional")
    T = u.shape[1]
    check_room(cache.length, T, cache.max_len)
    t0, t1 = cache.length, cache.length + T
    if mixer.input_norm is not None:
        u = mixer.input_norm(u)
    z = mixer.in_linear(u).transpose(1, 2)                                   # (B, 3H, T)
    if cache.z_tail is not None:
        # Zeros before position 0 are the causal conv's own zero padding.
        z = torch.cat([cache.z_tail, z.to(cache.z_tail.dtype)], dim=-1)
        cache.z_tail = z[..., -cache.z_tail.shape[-1]:].clone()
    x1, x2, v = mixer.short_conv(z)[..., -T:].split(mixer.hidden_size, dim=1)
    cache.v[..., t0:t1] = (v * x1).transpose(0, 1)
    y = _conv_outputs(mixer.long_conv, "long_conv", cache, cache.v, t1, T).to(x2.dtype) * x2
    if mixer.residual_conv is not None:
        cache.u[..., t0:t1] = u.permute(2, 0, 1)                              # (B, T, H) -> (H, B, T)
        y = y + _conv_outputs(mixer.residual_conv, "residual_conv", cache, cache.u, t1, T).to(y.dtype)
    cache.length = t1
    return mixer.out_linear(y, channels_first=True)


def _conv_outputs(conv: nn.Module, name: str, cache: MixerCache, history: torch.Tensor, t1: int,
                  T: int) -> torch.Tensor:
    """The long conv's outputs (B, H, T) at positions t1-T .. t1-1, given its inputs `history` (H, B, ≥t1)."""
    if T == 1 and isinstance(conv, LongConv):
        rev = cache.reversed_taps.get(name)
        if rev is None:
            k, _ = conv.filter(cache.max_len)
            rev = cache.reversed_taps[name] = k.to(history.dtype).flip(-1).contiguous()
        # Σ_s k[t-s]·v_s: the taps reversed and right-aligned under the history, one (B·1) bmm per channel.
        y = torch.bmm(history[..., :t1], rev[:, cache.max_len - t1:, None])      # (H, B, 1)
        y = y + conv.skip.to(history.dtype)[:, None, None] * history[..., t1 - 1:t1]
        return y.transpose(0, 1)
    return conv(history[..., :t1].transpose(0, 1).contiguous())[..., -T:]


@dataclass
class AttentionCache:
    """Keys and values of the positions decoded so far, (B, heads, max_len, head_dim) each."""

    max_len: int
    k: torch.Tensor
    v: torch.Tensor
    length: int = 0

    @staticmethod
    def new(attn: nn.Module, hidden_size: int, batch: int, max_len: int, device, dtype) -> "AttentionCache":
        shape = (batch, attn.num_heads, max_len, hidden_size // attn.num_heads)
        return AttentionCache(max_len, torch.zeros(shape, device=device, dtype=dtype),
                              torch.zeros(shape, device=device, dtype=dtype))


def attention_step(attn: nn.Module, x: torch.Tensor, cache: AttentionCache) -> torch.Tensor:
    """Causal self-attention's output (B, T, H) for the T positions after the cache's."""
    T = x.shape[1]
    check_room(cache.length, T, cache.max_len)
    t0, t1 = cache.length, cache.length + T
    q, k, v = attn.heads(x)
    cache.k[:, :, t0:t1] = k
    cache.v[:, :, t0:t1] = v
    mask = None
    if T > 1:
        # New query i (position t0 + i) sees keys 0 .. t0 + i.
        mask = torch.arange(t1, device=x.device)[None, :] <= torch.arange(t0, t1, device=x.device)[:, None]
    y = F.scaled_dot_product_attention(q, cache.k[:, :, :t1], cache.v[:, :, :t1], attn_mask=mask)
    cache.length = t1
    return attn.merge(y)


@dataclass
class DecodeState:
    """Per-block caches of a causal LM and the number of positions decoded so far."""

    max_len: int
    caches: list
    length: int = 0


__all__ = ["MixerCache", "AttentionCache", "DecodeState", "DecodeLengthError", "check_room", "mixer_step",
           "attention_step"]
