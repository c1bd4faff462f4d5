"""Architecture descriptions: one registered object per family owns its topology.

Every other module asks the description (usually through :class:`qcompile.model.ModelConfig`) for tensor
names, the linears of a layer, which of them share input statistics, the AWQ scale groups and the GGUF
hyper-parameters; nothing outside this package spells a Hugging Face tensor name. A new family is one
:func:`register` call here: a subclass overriding what differs, in the spirit of llama.cpp's
``@ModelBase.register`` converters and llm-compressor's architecture-keyed mappings.

HF -> GGUF tensor names come from gguf-py's ``TensorNameMap`` for the family's ``MODEL_ARCH`` (the table
llama.cpp's own converter uses), not from a hand table.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import gguf

from qcompile.errors import QCompileError


@dataclass(frozen=True)
class Architecture:
    """A decoder-only Qwen family in transformers' layout (Qwen2 / Qwen2.5 / Qwen3 dense).

    Class-level tables are the layout; instance fields are what a registered variant sets. A subclass for a
    family with more per layer (experts, linear-attention layers, a vision tower) overrides the tables and
    the methods that read them."""
    hf_name: str          # config.json "architectures"[0]
    model_type: str       # config.json "model_type" (also transformers' module: models.<model_type>)
    gguf_arch: str        # llama.cpp architecture name
    qkv_bias: bool        # q/k/v projections carry a bias (Qwen2 family)
    qk_norm: bool         # per-head RMSNorm on q and k (Qwen3)
    hf_prefix: str        # transformers class prefix: {prefix}DecoderLayer, {prefix}RotaryEmbedding, ...

    EMBED: ClassVar[str] = "model.embed_tokens.weight"
    FINAL_NORM: ClassVar[str] = "model.norm.weight"
    HEAD: ClassVar[str] = "lm_head.weight"
    LAYER: ClassVar[str] = "model.layers.{i}."
    # a layer's tensors relative to LAYER, in export order; optional ones are filtered by layer_tensor_names
    LAYER_TENSORS: ClassVar[tuple[str, ...]] = (
        "input_layernorm.weight",
        "self_attn.q_proj.weight", "self_attn.q_proj.bias",
        "self_attn.k_proj.weight", "self_attn.k_proj.bias",
        "self_attn.v_proj.weight", "self_attn.v_proj.bias",
        "self_attn.q_norm.weight", "self_attn.k_norm.weight",
        "self_attn.o_proj.weight",
        "post_attention_layernorm.weight",
        "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    )
    # llama.cpp's loader for the family requires output.weight even when the checkpoint ties it (qwen2moe)
    REQUIRES_OUTPUT: ClassVar[bool] = False
    # stacked routed-expert tensors of a layer (relative names): none in a dense family
    EXPERTS: ClassVar[tuple[str, ...]] = ()
    # the linear modules of a layer -> the module whose input statistics they use (q/k/v read one input,
    # as do gate/up): calibration hooks one input per group and stacks a group's rows
    LINEARS: ClassVar[dict[str, str]] = {
        "self_attn.q_proj": "self_attn.q_proj", "self_attn.k_proj": "self_attn.q_proj",
        "self_attn.v_proj": "self_attn.q_proj", "self_attn.o_proj": "self_attn.o_proj",
        "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.gate_proj", "mlp.down_proj": "mlp.down_proj",
    }
    # AWQ scale groups: (producer of the input, input statistics, consumers). Dividing the producer's output
    # channels (a norm's weight, or a linear's rows and bias) by s and multiplying the consumers' input
    # columns by s leaves the full-precision layer unchanged.
    SCALE_GROUPS: ClassVar[tuple[tuple[str, str, tuple[str, ...]], ...]] = (
        ("input_layernorm", "self_attn.q_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("post_attention_layernorm", "mlp.gate_proj", ("mlp.gate_proj", "mlp.up_proj")),
        ("mlp.up_proj", "mlp.down_proj", ("mlp.down_proj",)),
        # only without GQA: under GQA one v channel feeds several heads of o, which would need tied scales
        # (AutoAWQ skips this pair for the same reason)
        ("self_attn.v_proj", "self_attn.o_proj", ("self_attn.o_proj",)),
    )

    # ---- names ----------------------------------------------------------------------------------------
    def layer_prefix(self, i: int) -> str:
        return self.LAYER.format(i=i)

    def has(self, rel: str) -> bool:
        """Whether this variant's layers carry the tensor ``rel`` (q/k/v biases, q/k norms are optional)."""
        if rel.endswith(".bias") and not self.qkv_bias:
            return False
        return self.qk_norm or not (rel.startswith("self_attn.") and "_norm." in rel)

    def layer_tensor_names(self, i: int) -> list[str]:
        """HF names of layer ``i``'s tensors, in export order."""
        return [self.layer_prefix(i) + rel for rel in self.LAYER_TENSORS if self.has(rel)]

    def linear_names(self, i: int) -> list[str]:
        """HF weight names of layer ``i``'s linears, in :attr:`LINEARS` order."""
        return [f"{self.layer_prefix(i)}{lin}.weight" for lin in self.LINEARS]

    def split(self, name: str) -> tuple[int, str] | None:
        """(layer index, relative name) of a layer tensor's HF name; None for a tensor outside the layers."""
        before, _, after = self.LAYER.partition("{i}")
        if not name.startswith(before):
            return None
        index, sep, rel = name[len(before):].partition(after)
        return (int(index), rel) if sep and index.isdigit() else None

    def is_linear(self, name: str) -> bool:
        """Whether ``name`` is a decoder linear's weight."""
        where = self.split(name)
        return where is not None and where[1].removesuffix(".weight") in self.LINEARS and where[1].endswith(".weight")

    def is_expert(self, name: str) -> bool:
        """Whether ``name`` is a stacked routed-expert tensor (:class:`MoeArchitecture`'s ``EXPERTS``)."""
        where = self.split(name)
        return where is not None and where[1] in self.EXPERTS

    def head_source(self, tied: bool) -> str:
        """The checkpoint tensor the output matrix is read from (the embeddings when tied)."""
        return self.EMBED if tied else self.HEAD

    def bias_of(self, module: str) -> str:
        """The relative name of a module's bias (an AWQ producer that is a linear: its rows and bias)."""
        return f"{module}.bias"

    def producer_param(self, producer: str) -> str:
        """The non-linear tensor (relative name) that folding AWQ scales into ``producer`` changes."""
        return self.bias_of(producer) if producer in self.LINEARS else f"{producer}.weight"

    @property
    def moe(self) -> bool:
        """Whether the layers hold routed experts (:class:`MoeArchitecture`)."""
        return bool(self.EXPERTS)

    def traceable(self, model, cfg) -> None:
        """Make the weightless transformers ``model`` traceable by the graph exporters (dense: it is)."""

    def from_module(self, rel: str, value) -> dict:
        """A layer module's parameter (relative name) -> the layer tensors it holds, by relative name (the
        inverse of :meth:`module_state`; dense: itself)."""
        return {rel: value}

    def module_state(self, state: dict) -> dict:
        """A layer's tensors (relative names) -> its transformers module's state dict: the same for dense."""
        return state

    def gguf_names(self, n_layers: int) -> dict[str, str]:
        """HF tensor name -> GGUF tensor name for every tensor a model of ``n_layers`` may contain."""
        return dict(_gguf_names(self, n_layers))

    # ---- GGUF hyper-parameters -----------------------------------------------------------------------
    def add_gguf_hparams(self, w: gguf.GGUFWriter, cfg) -> None:
        """The family's llama.cpp hyper-parameters (``cfg``: :class:`qcompile.model.ModelConfig`)."""
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_heads)
        w.add_head_count_kv(cfg.num_kv_heads)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        if self.qk_norm or cfg.head_dim != cfg.hidden_size // cfg.num_heads:
            w.add_key_length(cfg.head_dim)
            w.add_value_length(cfg.head_dim)
        rs = cfg.rope_scaling or {}
        kind = rs.get("rope_type") or rs.get("type")
        if kind == "yarn" and "factor" in rs:
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(float(rs["factor"]))
            w.add_rope_scaling_orig_ctx_len(int(rs.get("original_max_position_embeddings",
                                                       cfg.max_position_embeddings)))
        elif kind == "linear" and "factor" in rs:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(rs["factor"]))


@lru_cache(maxsize=None)
def _gguf_names(arch: Architecture, n_layers: int) -> tuple[tuple[str, str], ...]:
    """gguf-py's TensorNameMap applied to every tensor name ``arch`` has (cached: a 64-layer map is built once
    per run). A name it cannot map is a bug in the description, not in the user's checkpoint."""
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch.gguf_arch)
    tmap = gguf.get_tensor_name_map(arch_id, n_layers)
    hf = [arch.EMBED, arch.FINAL_NORM, arch.HEAD] + [n for i in range(n_layers) for n in arch.layer_tensor_names(i)]
    out = []
    for name in hf:
        mapped = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise RuntimeError(f"gguf-py has no {arch.gguf_arch} name for {name}")
        out.append((name, mapped))
    return tuple(out)


ARCHITECTURES: dict[str, Architecture] = {}
_BY_MODEL_TYPE: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    """Make ``arch`` known by its config.json ``architectures`` entry and ``model_type``."""
    ARCHITECTURES[arch.hf_name] = arch
    _BY_MODEL_TYPE.setdefault(arch.model_type, arch)
    return arch


@dataclass(frozen=True)
class MoeArchitecture(Architecture):
    """A mixture-of-experts Qwen (``qwen2_moe``: Qwen1.5-MoE, Qwen2-57B-A14B, a shared expert behind a sigmoid
    gate; ``qwen3_moe``: Qwen3-30B-A3B / 235B-A22B, Qwen3-Coder, q/k norms, no shared expert).

    The experts are described as llama.cpp stores them: one stacked tensor per projection,
    ``mlp.experts.{gate,up,down}_proj.weight`` of shape [experts, rows, cols] (``ffn_*_exps``). Checkpoints
    hold them either one tensor per expert (``mlp.experts.{e}.gate_proj.weight``: what transformers saves and
    the releases ship) or fused as transformers 5's modules keep them (``mlp.experts.gate_up_proj``
    [E, 2I, H], ``mlp.experts.down_proj`` [E, H, I]); :meth:`stacked_sources` says which rows of which stored
    tensors make up a stacked one, so the checkpoint streams an expert tensor like any other."""
    norm_topk_prob: bool = False    # what llama.cpp's graph for this family does with the top-k weights

    PROJS: ClassVar[tuple[str, ...]] = ("gate_proj", "up_proj", "down_proj")
    EXPERTS_MODULE: ClassVar[str] = "mlp.experts"   # transformers' module holding them (fused gate_up_proj)
    EXPERTS: ClassVar[tuple[str, ...]] = tuple(f"mlp.experts.{p}.weight" for p in PROJS)
    SHARED: ClassVar[tuple[str, ...]] = ()     # a shared expert's tensors (qwen2_moe)
    LAYER_TENSORS: ClassVar[tuple[str, ...]] = Architecture.LAYER_TENSORS[:-3] + ("mlp.gate.weight", *EXPERTS)
    # the ordinary linears (attention); the experts are calibrated one by one by the engine, and the router
    # (ffn_gate_inp) stays float, as in llama.cpp
    LINEARS: ClassVar[dict[str, str]] = {k: v for k, v in Architecture.LINEARS.items() if k.startswith("self_attn.")}
    # AWQ: the attention's groups; the experts' input also feeds the router, which would have to see the same
    # function (not done yet: the experts get AWQ's imatrix-weighted rounding without scales)
    SCALE_GROUPS: ClassVar[tuple[tuple[str, str, tuple[str, ...]], ...]] = (
        Architecture.SCALE_GROUPS[0], Architecture.SCALE_GROUPS[3])

    @property
    def shared_expert(self) -> bool:
        """Whether the layers have qwen2_moe's always-on expert and its sigmoid gate."""
        return bool(self.SHARED)

    def stacked_sources(self, i: int, rel: str, n_experts: int, shapes: dict[str, tuple[int, ...]]
                        ) -> list[tuple[str, int, int]]:
        """The stored rows that make up the stacked expert tensor ``rel`` of layer ``i``, in order, as
        (stored name, first row, end row) with rows counted over all but the last dimension. ``shapes``:
        the checkpoint's stored tensors. Raises KeyError naming the first missing tensor."""
        pre, proj = self.layer_prefix(i), rel.split(".")[2]
        per_expert = [f"{pre}mlp.experts.{e}.{proj}.weight" for e in range(n_experts)]
        if per_expert[0] in shapes:
            out = []
            for name in per_expert:
                out.append((name, 0, _rows(shapes[name])))     # KeyError: that expert is missing
            return out
        fused = "gate_up_proj" if proj != "down_proj" else "down_proj"
        name = next((n for n in (f"{pre}mlp.experts.{fused}", f"{pre}mlp.experts.{fused}.weight") if n in shapes),
                    per_expert[0])
        shape = shapes[name]
        if proj == "down_proj":
            return [(name, 0, _rows(shape))]
        half = shape[-2] // 2   # gate_up_proj [E, 2I, H]: each expert's gate rows, then its up rows
        first = 0 if proj == "gate_proj" else half
        return [(name, e * 2 * half + first, e * 2 * half + first + half) for e in range(shape[0])]

    def expert_names(self, i: int) -> tuple[str, str, str]:
        """HF names of layer ``i``'s stacked expert tensors: (gate, up, down)."""
        gate, up, down = (self.layer_prefix(i) + rel for rel in self.EXPERTS)
        return gate, up, down

    def set_expert(self, experts, e: int, gate, up, down) -> None:
        """Put expert ``e``'s weights (torch tensors [I, H], [I, H], [H, I]) into transformers' experts module
        (``EXPERTS_MODULE``: gate and up fused in ``gate_up_proj``), for the calibration's second pass."""
        import torch
        with torch.no_grad():
            experts.gate_up_proj[e] = torch.cat([gate, up]).to(experts.gate_up_proj.dtype)
            experts.down_proj[e] = down.to(experts.down_proj.dtype)

    def traceable(self, model, cfg) -> None:
        """Swap each layer's experts module of the weightless ``model`` for one the exporters can trace
        (:mod:`qcompile.model.experts`: one MLP per expert, ``mlp.experts.{e}.gate_proj.weight`` ...)."""
        from qcompile.model.experts import swap_in_traced
        swap_in_traced(model, self, cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size)

    def module_state(self, state: dict) -> dict:
        """The layer's tensors (relative names, stacked experts) -> transformers' module parameters: its
        experts module holds gate and up fused (``gate_up_proj`` [E, 2I, H]) and ``down_proj`` [E, H, I]."""
        import torch
        out = {k: v for k, v in state.items() if not k.startswith("mlp.experts.")}
        out["mlp.experts.gate_up_proj"] = torch.cat([state["mlp.experts.gate_proj.weight"],
                                                     state["mlp.experts.up_proj.weight"]], dim=1)
        out["mlp.experts.down_proj"] = state["mlp.experts.down_proj.weight"]
        return out

    def from_module(self, rel: str, value) -> dict:
        """``mlp.experts.gate_up_proj`` [E, 2I, H] -> views of the stacked gate and up tensors [E, I, H];
        ``mlp.experts.down_proj`` -> the stacked down tensor; anything else: itself."""
        if rel == "mlp.experts.gate_up_proj":
            half = value.shape[1] // 2
            return {"mlp.experts.gate_proj.weight": value[:, :half], "mlp.experts.up_proj.weight": value[:, half:]}
        if rel == "mlp.experts.down_proj":
            return {"mlp.experts.down_proj.weight": value}
        return {rel: value}

    def add_gguf_hparams(self, w: gguf.GGUFWriter, cfg) -> None:
        super().add_gguf_hparams(w, cfg)
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_used)
        w.add_expert_feed_forward_length(cfg.expert_intermediate_size)
        if self.shared_expert:
            w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)


def _rows(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape[:-1]:
        n *= s
    return n


register(Architecture("Qwen2ForCausalLM", "qwen2", "qwen2", qkv_bias=True, qk_norm=False, hf_prefix="Qwen2"))
register(Architecture("Qwen3ForCausalLM", "qwen3", "qwen3", qkv_bias=False, qk_norm=True, hf_prefix="Qwen3"))
@dataclass(frozen=True)
class Qwen2MoeArchitecture(MoeArchitecture):
    """qwen2_moe: a shared expert (ordinary linears, ``ffn_*_shexp``) behind a sigmoid gate
    (``ffn_gate_inp_shexp``, float); llama.cpp's loader requires an output matrix, so a tied checkpoint's is
    written out."""
    SHARED: ClassVar[tuple[str, ...]] = tuple(f"mlp.shared_expert.{p}.weight" for p in MoeArchitecture.PROJS) + (
        "mlp.shared_expert_gate.weight",)
    LAYER_TENSORS: ClassVar[tuple[str, ...]] = MoeArchitecture.LAYER_TENSORS + SHARED
    LINEARS: ClassVar[dict[str, str]] = {
        **MoeArchitecture.LINEARS,
        "mlp.shared_expert.gate_proj": "mlp.shared_expert.gate_proj",
        "mlp.shared_expert.up_proj": "mlp.shared_expert.gate_proj",
        "mlp.shared_expert.down_proj": "mlp.shared_expert.down_proj",
    }
    REQUIRES_OUTPUT: ClassVar[bool] = True


register(Qwen2MoeArchitecture("Qwen2MoeForCausalLM", "qwen2_moe", "qwen2moe", qkv_bias=True, qk_norm=False,
                              hf_prefix="Qwen2Moe", norm_topk_prob=False))
register(MoeArchitecture("Qwen3MoeForCausalLM", "qwen3_moe", "qwen3moe", qkv_bias=False, qk_norm=True,
                         hf_prefix="Qwen3Moe", norm_topk_prob=True))


def supported() -> str:
    return ", ".join(ARCHITECTURES)


def lookup(raw: dict, where: object) -> Architecture:
    """The description of a parsed config.json; a one-line error naming what is supported otherwise."""
    names = raw.get("architectures") or []
    arch = ARCHITECTURES.get(names[0]) if names else _BY_MODEL_TYPE.get(raw.get("model_type", ""))
    if arch is None:
        what = names[0] if names else raw.get("model_type", "unknown")
        raise QCompileError(f"{where}: unsupported architecture {what!r}; supported: {supported()}")
    return arch
