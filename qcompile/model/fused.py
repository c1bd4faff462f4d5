"""Modules that stand in for a fused transformers projection whose parts qcompile quantizes apart.

Qwen3-Next's ``in_proj_qkvz`` is one linear in transformers and in the checkpoint, but two tensors in llama.cpp's
file (``attn_qkv`` and ``attn_gate``, given different types by its mix rules). The calibration builds the layer with
the two parts as real linears (hooked and replaced like any other) and this module in the fused one's place, so
transformers' own forward runs unchanged on them.
"""
from __future__ import annotations

import torch


class JoinedQKVZ(torch.nn.Module):
    """The fused projection's output, [q | k | v | z] per key head, from its parent's ``in_proj_qkv`` (every q,
    every k, every v) and ``in_proj_z``. The parent is held in a list so it is not registered as a submodule: the
    layer's parameters are the two parts, once."""

    def __init__(self, parent: torch.nn.Module, key_heads: int, key_dim: int, value_per_group: int):
        super().__init__()
        self._parent = [parent]
        self.nk, self.dk, self.vg = key_heads, key_dim, value_per_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, nk = self._parent[0], self.nk
        qkv, z = p.in_proj_qkv(x), p.in_proj_z(x)
        lead = x.shape[:-1]
        q, k, v = qkv.split([nk * self.dk, nk * self.dk, nk * self.vg], dim=-1)
        parts = [t.reshape(*lead, nk, -1) for t in (q, k, v, z)]
        return torch.cat(parts, dim=-1).reshape(*lead, nk * (2 * self.dk + 2 * self.vg))
