"""The routed experts of a mixture-of-experts layer in a form the graph exporters can trace.

transformers' experts module keeps the experts stacked (``gate_up_proj`` [E, 2I, H]) and loops over the experts
the batch *happens* to hit: a trace records that loop for its sample input only, and the stacked parameters
give the exporters no per-expert MatMul to put quantized weights into. For ONNX and OpenVINO the module is
swapped (on the weightless model) for :class:`TracedExperts`: one small MLP per expert with its own
``gate_proj`` / ``up_proj`` / ``down_proj`` (parameter names ``mlp.experts.{e}.gate_proj.weight``, as the
releases store them), every expert visited in a fixed order, each on the tokens routed to it, gathered with a
data-dependent ``nonzero`` (ONNX ``NonZero``, OpenVINO ``NonZero``) and added back with ``index_add``: the
work per token is its top-k experts, not all of them, and the graph holds no routing decision of the trace.

The expert quantized tensors are stacked ([E * rows, cols], llama.cpp's layout, what the calibration makes);
:func:`exporters.folder.split_experts` cuts them into the per-expert tensors the traced graph reads, byte
for byte.
"""
from __future__ import annotations

import torch
from torch import nn


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) * up(x))."""

    def __init__(self, hidden: int, inter: int, act):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.act_fn = act

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class TracedExperts(nn.ModuleList):
    """transformers' experts module's call, ``(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) ->
    [T, H]``, with every expert a traced branch of its own (see the module docstring)."""

    def __init__(self, n: int, hidden: int, inter: int, act):
        super().__init__(ExpertMLP(hidden, inter, act) for _ in range(n))

    def forward(self, x, top_k_index, top_k_weights):
        out = torch.zeros_like(x)
        for e, mlp in enumerate(self):
            hit = top_k_index == e                                   # [T, k]: at most one True per row
            rows = torch.nonzero(hit.any(dim=-1)).reshape(-1)        # the tokens routed to expert e
            weight = (top_k_weights * hit.to(top_k_weights.dtype)).sum(dim=-1, keepdim=True)
            y = mlp(x.index_select(0, rows)) * weight.index_select(0, rows)
            out = out.index_add(0, rows, y.to(out.dtype))
        return out


def swap_in_traced(model, arch, n_experts: int, hidden: int, inter: int) -> None:
    """Replace every layer's experts module (``arch.EXPERTS_MODULE``) of a transformers model by
    :class:`TracedExperts` with the same activation (its parameters are whatever the caller binds later)."""
    for layer in model.model.layers:
        old = layer.get_submodule(arch.EXPERTS_MODULE)
        parent, _, leaf = arch.EXPERTS_MODULE.rpartition(".")
        new = TracedExperts(n_experts, hidden, inter, old.act_fn)
        setattr(layer.get_submodule(parent) if parent else layer, leaf, new)


def per_expert_name(stacked: str, e: int) -> str:
    """``model.layers.3.mlp.experts.gate_proj.weight``, 5 -> ``model.layers.3.mlp.experts.5.gate_proj.weight``."""
    head, proj, w = stacked.rsplit(".", 2)
    return f"{head}.{e}.{proj}.{w}"


def stacked_of(name: str) -> tuple[str, int] | None:
    """The inverse of :func:`per_expert_name`: (stacked name, expert) or None for any other name."""
    parts = name.split(".")
    if len(parts) >= 4 and parts[-3].isdigit() and parts[-4] == "experts":
        return ".".join(parts[:-3] + parts[-2:]), int(parts[-3])
    return None

