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

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import ClassVar

import gguf
import numpy as np

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

    def bind(self, raw: dict) -> Architecture:
        """This description for one checkpoint's config (text part): a family whose layers differ by kind
        (:class:`HybridArchitecture`) records the schedule; the others are the same for every config."""
        return self

    def layer_tensors(self, i: int) -> tuple[str, ...]:
        """Layer ``i``'s tensors relative to its prefix, in export order, before :meth:`has` filters them."""
        return self.LAYER_TENSORS

    def linears(self, i: int) -> dict[str, str]:
        """Layer ``i``'s linears -> the module whose input statistics they use (:attr:`LINEARS`)."""
        return self.LINEARS

    def layer_tensor_names(self, i: int) -> list[str]:
        """HF names of layer ``i``'s tensors, in export order."""
        return [self.layer_prefix(i) + rel for rel in self.layer_tensors(i) if self.has(rel)]

    def linear_names(self, i: int) -> list[str]:
        """HF weight names of layer ``i``'s linears, in :meth:`linears` order."""
        return [f"{self.layer_prefix(i)}{lin}.weight" for lin in self.linears(i)]

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
        return where is not None and where[1].endswith(".weight") and \
            where[1].removesuffix(".weight") in self.linears(where[0])

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
        return self.bias_of(producer) if producer in self.all_linears() else f"{producer}.weight"

    def all_linears(self) -> dict[str, str]:
        """The linears of every kind of layer this family has (:meth:`linears` of each)."""
        return self.LINEARS

    @property
    def text_config_type(self) -> str:
        """transformers' ``model_type`` of the decoder's own config (a multimodal family nests it)."""
        return self.model_type

    @property
    def rotary_class(self) -> str:
        """transformers' rotary-embedding class for the decoder layers."""
        return f"{self.hf_prefix}RotaryEmbedding"

    @property
    def hybrid(self) -> bool:
        """Whether layers differ by kind (linear attention and full attention: :class:`HybridArchitecture`)."""
        return False

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

    @property
    def mtp_count(self) -> int:
        """Multi-token-prediction layers carried into the GGUF as llama.cpp's nextn layers (none: dense Qwen)."""
        return 0

    def mtp_tensor_names(self) -> list[str]:
        """HF names of the carried multi-token-prediction tensors, in export order (none)."""
        return []

    def row_views(self, i: int, raw: dict) -> dict[str, tuple[tuple[str, int, int], ...]]:
        """Layer ``i``'s tensors (relative names) that the checkpoint stores as rows of another, each as the
        (stored HF name, first row, end row) pieces it is made of, in order. Dense: none."""
        return {}

    def adapt_layer(self, layer, i: int):
        """transformers' decoder layer ``i`` reshaped to hold this description's tensors as its parameters
        (where :meth:`row_views` splits a stored tensor, the module gets the parts); dense: as built."""
        return layer

    def gguf_names(self, n_layers: int) -> dict[str, str]:
        """HF tensor name -> GGUF tensor name for every tensor a model of ``n_layers`` may contain."""
        return dict(_gguf_names(self, n_layers))

    def gguf_key(self, name: str) -> str:
        """The name gguf-py's ``TensorNameMap`` knows ``name`` by (llama.cpp's converter renames a few first)."""
        return name

    def gguf_name(self, name: str) -> str | None:
        """The GGUF name of a tensor gguf-py's map for the family does not list (None: ask the map)."""
        return None

    def gguf_layout(self, name: str, cfg) -> GgufLayout | None:
        """How tensor ``name`` is laid out in llama.cpp's file when that differs from the checkpoint (None: as
        stored). Dense Qwen: always as stored."""
        return None

    # ---- GGUF hyper-parameters -----------------------------------------------------------------------
    def add_gguf_hparams(self, w: gguf.GGUFWriter, cfg) -> None:
        """The family's llama.cpp hyper-parameters (``cfg``: :class:`qcompile.model.ModelConfig`)."""
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_layers + cfg.mtp_layers)
        if cfg.intermediate_size:   # an MoE config may have no dense width (qwen3_5_moe); the converter then writes none
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
    tmap = gguf.get_tensor_name_map(arch_id, n_layers + arch.mtp_count)
    hf = [arch.EMBED, arch.FINAL_NORM, arch.HEAD] + [n for i in range(n_layers) for n in arch.layer_tensor_names(i)]
    hf += arch.mtp_tensor_names()
    out = []
    for name in hf:
        mapped = arch.gguf_name(name) or tmap.get_name(arch.gguf_key(name), try_suffixes=(".weight", ".bias"))
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


@dataclass(frozen=True, eq=False)
class GgufLayout:
    """How llama.cpp's converter stores one tensor when that differs from the checkpoint: rows and columns
    reordered (whole rows: a permutation of rows commutes with row-wise quantization; columns do not), values
    shifted or mapped, a shape squeezed. ``to_gguf`` / ``from_gguf`` are exact inverses up to float rounding."""
    rows: np.ndarray | None = None    # the checkpoint row (or vector element) of each row in the file
    cols: np.ndarray | None = None    # the checkpoint column of each column in the file
    offset: float = 0.0               # file value = checkpoint value + offset (Qwen3.5's zero-centred norms)
    neg_exp: bool = False             # file value = -exp(checkpoint value) (A_log -> A)
    shape: tuple[int, ...] | None = None   # the file's logical shape (conv1d [C, 1, K] -> [C, K]) ...
    stored: tuple[int, ...] | None = None  # ... and then the checkpoint's, which from_gguf restores

    def to_gguf(self, a: np.ndarray) -> np.ndarray:
        a = np.asarray(a, dtype=np.float32)
        if self.shape is not None:
            a = a.reshape(self.shape)
        if self.rows is not None:
            a = a[self.rows]
        if self.cols is not None:
            a = a[:, self.cols]
        if self.neg_exp:
            a = -np.exp(a)
        return (a + np.float32(self.offset)) if self.offset else a

    def from_gguf(self, a: np.ndarray) -> np.ndarray:
        """The checkpoint's values, in its shape, from the file's."""
        a = np.asarray(a, dtype=np.float32)
        if self.offset:
            a = a - np.float32(self.offset)
        if self.neg_exp:
            a = np.log(-a)
        if self.cols is not None:
            a = a[:, np.argsort(self.cols)]
        if self.rows is not None:
            a = a[np.argsort(self.rows)]
        return a if self.stored is None else a.reshape(self.stored)


def head_major(n_groups: int, per_group: int, width: int) -> np.ndarray:
    """The order llama.cpp's qwen35 converter gives value heads: grouped by key head in the checkpoint
    ([g0v0, g0v1, g1v0, g1v1]) -> tiled ([g0v0, g1v0, g0v1, g1v1]) so that ggml broadcasts the key heads;
    ``width`` rows per head. Index of the checkpoint row for each file row."""
    return np.arange(n_groups * per_group * width).reshape(n_groups, per_group, width).transpose(1, 0, 2).reshape(-1)


@dataclass(frozen=True)
class HybridArchitecture(Architecture):
    """Qwen3.5 / Qwen3.6 (``qwen3_5``: Gated DeltaNet linear-attention layers and gated full-attention layers,
    three of the first for each of the second by config's ``layer_types``).

    A full-attention layer's q_proj holds the query and its output gate (2 x heads x head_dim rows); q/k norms;
    partial RoPE. A linear-attention layer: ``in_proj_qkv`` / ``in_proj_z`` / ``in_proj_b`` / ``in_proj_a`` read
    the normed input, a depthwise causal ``conv1d`` over q/k/v, ``dt_bias`` / ``A_log`` per value head, a gated
    RMSNorm, ``out_proj``. Every norm except that gated one is zero-centred (``x * (1 + w)``), stored by
    llama.cpp as ``1 + w``. The multimodal checkpoints (``*ForConditionalGeneration``) keep the text model under
    ``model.language_model.`` with its hyper-parameters in ``text_config``; the vision tower (``model.visual.``) is
    :mod:`qcompile.model.vision`'s. The multi-token-prediction layers (``mtp.layers.{j}``, full-attention blocks,
    and ``mtp.fc`` / its norms) are layers ``n, n + 1, ...`` after the decoder's ``n`` (:meth:`layer_prefix`,
    :meth:`split`), as llama.cpp's converter numbers its nextn layers; only the export reads them."""
    layer_kinds: tuple[str, ...] = ()     # "linear_attention" | "full_attention" per layer (bound by read_config)
    text_prefix: str = "model."           # "model.language_model." in a multimodal checkpoint
    config_type: str = ""                 # transformers' model_type of the text config (qwen3_5_text)
    rotary: str = ""                      # transformers' rotary class (Qwen3_5TextRotaryEmbedding)
    mtp_layers: int = 0                   # multi-token-prediction layers carried (``mtp.layers.{j}``; 0: dropped)

    FULL_ATTENTION: ClassVar[tuple[str, ...]] = (
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
        "self_attn.q_norm.weight", "self_attn.k_norm.weight", "self_attn.o_proj.weight")
    LINEAR_ATTENTION: ClassVar[tuple[str, ...]] = (
        "linear_attn.in_proj_qkv.weight", "linear_attn.in_proj_z.weight", "linear_attn.in_proj_b.weight",
        "linear_attn.in_proj_a.weight", "linear_attn.conv1d.weight", "linear_attn.dt_bias", "linear_attn.A_log",
        "linear_attn.norm.weight", "linear_attn.out_proj.weight")
    LINEAR_LINEARS: ClassVar[dict[str, str]] = {
        "linear_attn.in_proj_qkv": "linear_attn.in_proj_qkv", "linear_attn.in_proj_z": "linear_attn.in_proj_qkv",
        "linear_attn.in_proj_b": "linear_attn.in_proj_qkv", "linear_attn.in_proj_a": "linear_attn.in_proj_qkv",
        "linear_attn.out_proj": "linear_attn.out_proj"}
    # AWQ: only up -> down. The norms are zero-centred (x * (1 + w)): folding a scale into one is not the
    # division the other families' groups do; and a linear-attention layer's q/k pass through an L2 norm.
    SCALE_GROUPS: ClassVar[tuple[tuple[str, str, tuple[str, ...]], ...]] = (
        ("mlp.up_proj", "mlp.down_proj", ("mlp.down_proj",)),)
    # llama.cpp's converter stores more value heads than key heads in tiled order (qwen35); and writes the
    # interleaved M-RoPE sections (qwen35 loaders require them)
    TILED_V: ClassVar[bool] = True
    MROPE: ClassVar[bool] = True

    @property
    def EMBED(self) -> str:  # the base's class constant, per instance here
        return f"{self.text_prefix}embed_tokens.weight"

    @property
    def FINAL_NORM(self) -> str:
        return f"{self.text_prefix}norm.weight"

    @property
    def LAYER(self) -> str:
        return self.text_prefix + "layers.{i}."

    def bind(self, raw: dict) -> HybridArchitecture:
        n = int(raw["num_hidden_layers"])
        kinds = raw.get("layer_types") or [
            "full_attention" if (i + 1) % int(raw.get("full_attention_interval", 4)) == 0 else "linear_attention"
            for i in range(n)]
        if len(kinds) != n or set(kinds) - {"linear_attention", "full_attention"}:
            raise ValueError(f"layer_types {kinds!r} (need {n} of linear_attention / full_attention)")
        return replace(self, layer_kinds=tuple(kinds))

    @property
    def hybrid(self) -> bool:
        return True

    def kind(self, i: int) -> str:
        """A layer's kind; the multi-token-prediction blocks after the decoder are full-attention blocks."""
        return self.layer_kinds[i] if i < len(self.layer_kinds) else "full_attention"

    # ---- multi-token prediction: llama.cpp's nextn layers, after the decoder's --------------------------------
    # mtp.{fc, pre_fc_norm_embedding, pre_fc_norm_hidden, norm} -> the first nextn layer's eh_proj, enorm, hnorm,
    # shared_head_norm. gguf-py 0.19's tables do not list these for qwen35 / qwen35moe / qwen3next yet (the
    # llama.cpp it would match does), so the names come from its TENSOR_NAMES directly (by member name: an older
    # gguf-py without them still imports, for the families that do not need them)
    MTP_EXTRAS: ClassVar[dict[str, str]] = {
        "fc": "NEXTN_EH_PROJ", "pre_fc_norm_embedding": "NEXTN_ENORM", "pre_fc_norm_hidden": "NEXTN_HNORM",
        "norm": "NEXTN_SHARED_HEAD_NORM"}

    @property
    def mtp_count(self) -> int:
        return self.mtp_layers

    def with_mtp(self, n: int) -> HybridArchitecture:
        """This description carrying ``n`` multi-token-prediction layers (0: dropped, ``--no-mtp``)."""
        return replace(self, mtp_layers=n)

    def gguf_name(self, name: str) -> str | None:
        part = name.split(".")[1] if name.startswith("mtp.") and name.count(".") == 2 else None
        if part not in self.MTP_EXTRAS:
            return None
        member = getattr(gguf.MODEL_TENSOR, self.MTP_EXTRAS[part])
        return gguf.TENSOR_NAMES[member].format(bid=len(self.layer_kinds)) + ".weight"

    def layer_prefix(self, i: int) -> str:
        n = len(self.layer_kinds)
        return self.LAYER.format(i=i) if i < n or not n else f"mtp.layers.{i - n}."

    def split(self, name: str) -> tuple[int, str] | None:
        if name.startswith("mtp.layers."):
            index, _, rel = name[len("mtp.layers."):].partition(".")
            return (len(self.layer_kinds) + int(index), rel) if index.isdigit() and rel else None
        return super().split(name)

    def is_linear(self, name: str) -> bool:
        """A decoder linear (calibrated, budgeted); a multi-token-prediction layer's are not: the decoder's
        forward never runs them, so they get RTN with the scheme's types."""
        return not name.startswith("mtp.") and super().is_linear(name)

    def is_expert(self, name: str) -> bool:
        return not name.startswith("mtp.") and super().is_expert(name)

    def mtp_tensor_names(self) -> list[str]:
        n = len(self.layer_kinds)
        names = [nm for i in range(n, n + self.mtp_layers) for nm in self.layer_tensor_names(i)]
        return names + [f"mtp.{k}.weight" for k in self.MTP_EXTRAS] if self.mtp_layers else names

    def _ffn(self) -> tuple[str, ...]:
        return tuple(t for t in super().layer_tensors(0) if t.startswith("mlp."))

    def layer_tensors(self, i: int) -> tuple[str, ...]:
        mixer = self.LINEAR_ATTENTION if self.kind(i) == "linear_attention" else self.FULL_ATTENTION
        return ("input_layernorm.weight", *mixer, "post_attention_layernorm.weight", *self._ffn())

    def linears(self, i: int) -> dict[str, str]:
        ffn = {k: v for k, v in super().linears(i).items() if k.startswith("mlp.")}
        if self.kind(i) == "linear_attention":
            return {**self.LINEAR_LINEARS, **ffn}
        return {k: v for k, v in Architecture.LINEARS.items() if k.startswith("self_attn.")} | ffn

    def all_linears(self) -> dict[str, str]:
        return {**Architecture.LINEARS, **self.LINEAR_LINEARS, **super().all_linears()}

    @property
    def text_config_type(self) -> str:
        return self.config_type

    @property
    def rotary_class(self) -> str:
        return self.rotary

    def gguf_key(self, name: str) -> str:
        """The converter reads the text model as ``model.``, names dt_bias dt_proj.bias, and renames the
        multi-token-prediction tensors into the layers after the decoder's (nextn)."""
        if name.startswith("mtp.layers."):
            i, rel = self.split(name)
            return f"model.layers.{i}.{rel}"
        if name.startswith(self.text_prefix):
            name = "model." + name[len(self.text_prefix):]
        return name.removesuffix(".dt_bias") + ".dt_proj.bias" if name.endswith(".dt_bias") else name

    @staticmethod
    def linear_heads(raw: dict) -> tuple[int, int, int, int]:
        """The linear-attention heads of a config: (key heads, key head dim, value heads, value head dim)."""
        return (int(raw["linear_num_key_heads"]), int(raw["linear_key_head_dim"]),
                int(raw["linear_num_value_heads"]), int(raw["linear_value_head_dim"]))

    def gguf_layout(self, name: str, cfg) -> GgufLayout | None:
        """llama.cpp's qwen35 converter: ``1 + w`` for the zero-centred norms, ``A = -exp(A_log)``, conv1d
        squeezed to [channels, kernel], and, when there are more value heads than key heads, the value heads
        in tiled order in every tensor that has them (rows of in_proj_qkv's v part, in_proj_z / a / b, conv1d's
        v channels, dt_bias, A_log; columns of out_proj)."""
        where = self.split(name)
        rel = where[1] if where else None
        if name.endswith("norm.weight") and rel != "linear_attn.norm.weight":
            return GgufLayout(offset=1.0)
        if rel is None or not rel.startswith("linear_attn."):
            return None
        r = cfg.raw
        nk, dk, nv, dv = self.linear_heads(r)
        tiled = self.TILED_V and nv != nk
        order = (lambda width: head_major(nk, nv // nk, width)) if tiled else (lambda width: None)
        qk = np.arange(2 * nk * dk)
        v_rows = order(dv)
        qkv = None if v_rows is None else np.concatenate([qk, 2 * nk * dk + v_rows])
        if rel == "linear_attn.in_proj_qkv.weight":
            return GgufLayout(rows=qkv) if qkv is not None else None
        if rel == "linear_attn.conv1d.weight":
            channels, kernel = 2 * nk * dk + nv * dv, int(r.get("linear_conv_kernel_dim", 4))
            return GgufLayout(rows=qkv, shape=(channels, kernel), stored=(channels, 1, kernel))
        if rel == "linear_attn.in_proj_z.weight":
            return GgufLayout(rows=v_rows) if v_rows is not None else None
        if rel in ("linear_attn.in_proj_a.weight", "linear_attn.in_proj_b.weight", "linear_attn.dt_bias"):
            return GgufLayout(rows=order(1)) if tiled else None
        if rel == "linear_attn.A_log":
            return GgufLayout(rows=order(1), neg_exp=True)
        if rel == "linear_attn.out_proj.weight":
            return GgufLayout(cols=v_rows) if v_rows is not None else None
        return None

    def add_gguf_hparams(self, w: gguf.GGUFWriter, cfg) -> None:
        super().add_gguf_hparams(w, cfg)
        r = cfg.raw
        nk, dk, nv, dv = self.linear_heads(r)
        w.add_ssm_conv_kernel(int(r.get("linear_conv_kernel_dim", 4)))
        w.add_ssm_state_size(dk)
        w.add_ssm_group_count(nk)
        w.add_ssm_time_step_rank(nv)
        w.add_ssm_inner_size(dv * nv)
        # gguf-py 0.19 has no add_recurrent_layers; the key is llama.cpp's (Keys.Attention.RECURRENT_LAYERS)
        w.add_array(f"{self.gguf_arch}.attention.recurrent_layers",
                    [k == "linear_attention" for k in self.layer_kinds] + [False] * self.mtp_layers)
        if self.mtp_layers:
            w.add_nextn_predict_layers(self.mtp_layers)
        w.add_full_attention_interval(int(r.get("full_attention_interval", 4)))
        rope = r.get("rope_parameters") or r.get("rope_scaling") or {}
        partial = float(rope.get("partial_rotary_factor", r.get("partial_rotary_factor", 0.25)))
        w.add_rope_dimension_count(int(cfg.head_dim * partial))
        if not self.MROPE:
            return
        # interleaved M-RoPE sections (time, height, width); llama.cpp's qwen35 loaders require the key
        sections = list(rope.get("mrope_section") or [11, 11, 10])
        w.add_rope_dimension_sections((sections + [0, 0, 0, 0])[:4])


@dataclass(frozen=True)
class HybridMoeArchitecture(HybridArchitecture, Qwen2MoeArchitecture):
    """Qwen3.5 / Qwen3.6 MoE (``qwen3_5_moe``: Qwen3.5-35B-A3B, 122B-A10B, 397B-A17B): the hybrid layers with
    routed experts (top-k weights renormalised) and a shared expert behind a sigmoid gate. The experts get no
    AWQ scales (their input feeds the router too)."""
    REQUIRES_OUTPUT: ClassVar[bool] = False
    SCALE_GROUPS: ClassVar[tuple[tuple[str, str, tuple[str, ...]], ...]] = ()


register(HybridArchitecture("Qwen3_5ForCausalLM", "qwen3_5", "qwen35", qkv_bias=False, qk_norm=True,
                            hf_prefix="Qwen3_5", config_type="qwen3_5_text", rotary="Qwen3_5TextRotaryEmbedding"))
register(HybridArchitecture("Qwen3_5ForConditionalGeneration", "qwen3_5", "qwen35", qkv_bias=False, qk_norm=True,
                            hf_prefix="Qwen3_5", text_prefix="model.language_model.", config_type="qwen3_5_text",
                            rotary="Qwen3_5TextRotaryEmbedding"))
register(HybridMoeArchitecture("Qwen3_5MoeForCausalLM", "qwen3_5_moe", "qwen35moe", qkv_bias=False, qk_norm=True,
                               hf_prefix="Qwen3_5Moe", norm_topk_prob=True, config_type="qwen3_5_moe_text",
                               rotary="Qwen3_5MoeTextRotaryEmbedding"))
register(HybridMoeArchitecture("Qwen3_5MoeForConditionalGeneration", "qwen3_5_moe", "qwen35moe", qkv_bias=False,
                               qk_norm=True, hf_prefix="Qwen3_5Moe", norm_topk_prob=True,
                               text_prefix="model.language_model.", config_type="qwen3_5_moe_text",
                               rotary="Qwen3_5MoeTextRotaryEmbedding"))


@dataclass(frozen=True)
class Qwen3NextArchitecture(HybridMoeArchitecture):
    """Qwen3-Next (``qwen3_next``: Qwen3-Next-80B-A3B): Qwen3.5-MoE's layers with the linear attention's input
    projections fused as transformers and the releases store them. ``in_proj_qkvz`` holds, per key head, its q and
    k rows and its value heads' v and z rows; ``in_proj_ba``, per key head, its value heads' b then a rows.
    llama.cpp's converter writes the first as two tensors (``attn_qkv``: every q, every k, every v; ``attn_gate``:
    z), which llama.cpp's mix rules give different types, so here they are two linears, ``in_proj_qkv`` and
    ``in_proj_z``, read as rows of the stored tensor (:meth:`row_views`) and joined back into the fused output in
    the calibration's module (:meth:`adapt_layer`); ``in_proj_ba`` stays one tensor (``ssm_ba``). Value heads
    keep the grouped order (llama.cpp's qwen3next graph takes it); plain partial RoPE."""
    TILED_V: ClassVar[bool] = False
    MROPE: ClassVar[bool] = False
    LINEAR_ATTENTION: ClassVar[tuple[str, ...]] = (
        "linear_attn.in_proj_qkv.weight", "linear_attn.in_proj_z.weight", "linear_attn.in_proj_ba.weight",
        "linear_attn.conv1d.weight", "linear_attn.dt_bias", "linear_attn.A_log", "linear_attn.norm.weight",
        "linear_attn.out_proj.weight")
    LINEAR_LINEARS: ClassVar[dict[str, str]] = {
        "linear_attn.in_proj_qkv": "linear_attn.in_proj_qkv", "linear_attn.in_proj_z": "linear_attn.in_proj_qkv",
        "linear_attn.in_proj_ba": "linear_attn.in_proj_qkv", "linear_attn.out_proj": "linear_attn.out_proj"}

    def _heads(self, raw: dict) -> tuple[int, int, int, int]:
        """(key heads, key head dim, value heads per key head, value head dim)."""
        nk, nv = int(raw["linear_num_key_heads"]), int(raw["linear_num_value_heads"])
        return nk, int(raw["linear_key_head_dim"]), nv // nk, int(raw["linear_value_head_dim"])

    def row_views(self, i: int, raw: dict) -> dict[str, tuple[tuple[str, int, int], ...]]:
        if self.kind(i) != "linear_attention":
            return {}
        nk, dk, nv, dv = self.linear_heads(raw)
        r = nv // nk
        fused, per = f"{self.layer_prefix(i)}linear_attn.in_proj_qkvz.weight", 2 * dk + 2 * r * dv
        q = [(fused, g * per, g * per + dk) for g in range(nk)]
        k = [(fused, g * per + dk, g * per + 2 * dk) for g in range(nk)]
        v = [(fused, g * per + 2 * dk, g * per + 2 * dk + r * dv) for g in range(nk)]
        z = [(fused, g * per + 2 * dk + r * dv, (g + 1) * per) for g in range(nk)]
        return {"linear_attn.in_proj_qkv.weight": tuple(q + k + v), "linear_attn.in_proj_z.weight": tuple(z)}

    def adapt_layer(self, layer, i: int):
        """A linear-attention layer's ``in_proj_qkvz`` becomes ``in_proj_qkv`` + ``in_proj_z`` (real linears: the
        calibration hooks and replaces them) and a parameterless module interleaving their outputs per key head
        as the fused projection did, so transformers' forward runs unchanged."""
        if self.kind(i) != "linear_attention":
            return layer
        import torch

        from qcompile.model.fused import JoinedQKVZ
        la = layer.linear_attn
        fused = la.in_proj_qkvz
        nk, dk, vd = la.num_k_heads, la.head_k_dim, la.value_dim
        with torch.device(fused.weight.device):
            la.in_proj_qkv = torch.nn.Linear(fused.in_features, 2 * nk * dk + vd, bias=False, dtype=fused.weight.dtype)
            la.in_proj_z = torch.nn.Linear(fused.in_features, vd, bias=False, dtype=fused.weight.dtype)
        la.in_proj_qkvz = JoinedQKVZ(la, nk, dk, vd // nk)
        return layer


register(Qwen3NextArchitecture("Qwen3NextForCausalLM", "qwen3_next", "qwen3next", qkv_bias=False, qk_norm=True,
                               hf_prefix="Qwen3Next", norm_topk_prob=True, config_type="qwen3_next",
                               rotary="Qwen3NextRotaryEmbedding"))


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
