"""ONNX exporter: a Qwen2/Qwen3 decoder with KV cache for onnxruntime, its linears as ``MatMulNBits``.

The full-precision graph comes from ``torch.onnx.export`` of the transformers model behind a wrapper
with a flat signature, so inputs and outputs carry optimum's names (``input_ids``, ``attention_mask``,
``position_ids``, ``past_key_values.N.key/value`` -> ``logits``, ``present.N.key/value``) and
``ORTModelForCausalLM`` loads the folder.

``lm_head`` is quantized like a linear when ``tensors`` holds ``lm_head.weight``; a tied matrix left in
float is stored once (the head reads the embedding table through a Transpose). (optimum's own exporter would do this, but optimum-onnx
pins transformers < 4.58; the graph it writes is the same TorchScript export.)

Then graph surgery, by hand because no library swaps in *given* quantized weights (onnxruntime's
``MatMulNBitsQuantizer`` quantizes by itself): every linear's ``MatMul`` whose weight we quantized
becomes ``com.microsoft::MatMulNBits`` fed with our packed codes, float scales and zero points, the
very bytes of :class:`~quantizers.tensor.QuantizedTensor` on an :class:`~quantizers.grids.IntType`
grid. Nothing is re-quantized here.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from exporters.folder import FolderTarget
from exporters.target import register
from qcompile.errors import UsageError
from qcompile.model import Checkpoint, ModelConfig
from qcompile.spill import release
from quantizers.grids import IntType
from quantizers.tensor import QuantizedTensor

ONNX_FILE = "model.onnx"
DATA_FILE = "model.onnx_data"
OPSET = 17
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
              "merges.txt", "special_tokens_map.json", "added_tokens.json")


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    """Graph input and output names, as optimum's ORTModelForCausalLM expects them."""
    ins, outs = ["input_ids", "attention_mask", "position_ids"], ["logits"]
    for i in range(n_layers):
        ins += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outs += [f"present.{i}.key", f"present.{i}.value"]
    return ins, outs


def _wrapper(model, weights: list[str]):
    """A flat-signature module for the tracer: (input_ids, attention_mask, position_ids, k0, v0, ..., then one
    tensor per name in ``weights``) -> (logits, k0', v0', ...). The weights are forward *inputs*, not
    parameters, so the exporter never treats them as constants (its shape inference would otherwise
    evaluate every Transpose of a weight: a second copy of the model). They are slotted into the modules'
    parameter tables for the call by hand, because ``torch.func.functional_call`` refuses to run under
    the tracer."""
    import torch
    from transformers import DynamicCache
    slots: dict[int, list] = {}   # parameter -> every (module, key) holding it (tied ones: two)
    for mod in model.modules():
        for key, prm in mod._parameters.items():
            if prm is not None:
                slots.setdefault(id(prm), []).append((mod, key))
    params = dict(model.named_parameters())
    where = [slots[id(params[w])] for w in weights]

    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *rest):
            n = 2 * self.model.config.num_hidden_layers
            past, values = rest[:n], rest[n:]
            pairs = [(past[2 * i], past[2 * i + 1]) for i in range(n // 2)]
            try:  # transformers >= 5: layers filled directly, since update() concatenates onto an empty
                # 1-D tensor, which torch allows but OpenVINO's PyTorch frontend cannot convert
                cache = DynamicCache(config=self.model.config)
                for layer, (k, v) in zip(cache.layers, pairs):
                    layer.lazy_initialization(k, v)
                    layer.keys, layer.values = k, v
            except TypeError:  # transformers 4.x
                cache = DynamicCache.from_legacy_cache(tuple(pairs))
            for held, value in zip(where, values):
                for mod, key in held:
                    mod._parameters[key] = value
            try:
                out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 past_key_values=cache, use_cache=True)
            finally:
                for held, w in zip(where, weights):
                    for mod, key in held:
                        mod._parameters[key] = params[w]
            cache = getattr(out, "past_key_values", None) or getattr(out, "cache")
            present = [t for layer in cache.layers for t in (layer.keys, layer.values)]
            return (out.logits, *present)
    return Flat().eval()


def _weightless(model_dir: Path, cfg: ModelConfig):
    """The transformers model with no weights in memory: built on the meta device, every parameter then a
    zero-strided view of one float32 zero (shape right, ~0 bytes), the rotary buffers rebuilt on the CPU.

    The tracer only needs shapes and a forward pass that runs; the weights enter the graph later, one
    tensor at a time from the checkpoint (``bind_weights``). Tied parameters stay one object."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        cfg.arch.traceable(model, cfg)   # MoE: experts the trace can follow (on meta too: no memory)
    if config.tie_word_embeddings:  # (transformers 5.0 ties only when loading weights: tie here, explicitly)
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    zero, done = torch.zeros((), dtype=torch.float32), {}
    for mod in model.modules():
        for key, p in list(mod._parameters.items()):
            if p is not None:
                done.setdefault(id(p), torch.nn.Parameter(zero.expand(p.shape), requires_grad=False))
                mod._parameters[key] = done[id(p)]
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=model.config)
    meta = [n for n, b in model.named_buffers() if b.is_meta]
    if meta:
        raise RuntimeError(f"cannot rebuild buffers {meta} outside the meta device")
    return model.eval()


def trace_inputs(model, cfg: ModelConfig) -> tuple[dict, tuple]:
    """The parameters (tied ones once, under their first name) and a sample argument tuple for
    :func:`_wrapper` of ``model``: batch 2, a non-empty past, so every dimension is traced as dynamic."""
    import torch
    n, kvh, hd = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    b, p, s = 2, 3, 4
    past = [torch.zeros(b, kvh, p, hd) for _ in range(2 * n)]
    weights = dict(model.named_parameters())
    args = (torch.randint(0, cfg.vocab_size, (b, s)), torch.ones(b, p + s, dtype=torch.long),
            torch.arange(p, p + s).expand(b, s).contiguous(), *past, *weights.values())
    return weights, args


def export_fp(model_dir: Path, cfg: ModelConfig, path: Path) -> None:
    """The float32 decoder graph with KV cache to ``path``, its weights left as graph inputs named by their
    HF names: the model is traced without its weights in memory, so a 7B export costs a trace, not 28 GB.
    ``bind_weights`` turns those inputs into initializers."""
    import torch
    model = _weightless(model_dir, cfg)
    weights, args = trace_inputs(model, cfg)
    ins, outs = io_names(cfg.num_layers)
    dyn = {"input_ids": {0: "batch_size", 1: "sequence_length"},
           "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
           "position_ids": {0: "batch_size", 1: "sequence_length"},
           "logits": {0: "batch_size", 1: "sequence_length"}}
    for name in ins[3:]:
        dyn[name] = {0: "batch_size", 2: "past_sequence_length"}
    for name in outs[1:]:
        dyn[name] = {0: "batch_size", 2: "total_sequence_length"}
    import warnings
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python control flow on shapes: mask is always given
        torch.onnx.export(_wrapper(model, list(weights)), args, str(path), dynamo=False,
                          input_names=ins + list(weights), output_names=outs, dynamic_axes=dyn,
                          opset_version=OPSET, do_constant_folding=True)


class ExternalData:
    """Writes initializers straight into the external data file as they are made and returns
    ``TensorProto``s that point at them, so no weight bytes accumulate in the in-memory graph (onnx's own
    ``save_model(save_as_external_data=True)`` only moves them out at the end, after all were held).
    Small tensors stay inline, as onnx's ``size_threshold`` does."""

    ALIGN, INLINE = 64, 1024

    def __init__(self, path: Path):
        self.path, self.f, self.offset = path, open(path, "wb"), 0

    def __call__(self, array: np.ndarray, name: str):
        from onnx import numpy_helper
        a = np.ascontiguousarray(array)
        if a.nbytes < self.INLINE:
            return numpy_helper.from_array(a, name)
        return self.stream(name, a.shape, a.dtype, [a])

    def stream(self, name: str, shape: tuple[int, ...], dtype, parts):
        """An external tensor written from ``parts`` (consecutive pieces in row-major order, e.g. row
        chunks of a checkpoint tensor), so not even one whole tensor need be in memory."""
        import onnx
        from onnx import helper
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        t = onnx.TensorProto(name=name, dims=shape, data_type=helper.np_dtype_to_tensor_dtype(dtype),
                             data_location=onnx.TensorProto.EXTERNAL)
        for k, v in (("location", self.path.name), ("offset", self.offset), ("length", nbytes)):
            t.external_data.add(key=k, value=str(v))
        written = 0
        for part in parts:
            part = np.ascontiguousarray(part, dtype)
            self.f.write(memoryview(part).cast("B"))
            written += part.nbytes
        if written != nbytes:
            raise RuntimeError(f"{name}: wrote {written} bytes for a {nbytes}-byte tensor")
        pad = -nbytes % self.ALIGN
        self.f.write(b"\0" * pad)
        self.offset += nbytes + pad
        return t

    def close(self) -> None:
        self.f.close()


def _inline(array: np.ndarray, name: str):
    from onnx import numpy_helper
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def bind_weights(model, read, params: dict[str, np.ndarray] | None = None, store=_inline,
                 rows=None) -> None:
    """Replace every parameter input still read by the graph with an initializer: ``params[name]`` when
    given (AWQ-folded norms/biases), else ``read(name)`` (float32, straight from the checkpoint); inputs
    nobody reads (weights of swapped linears) are dropped. A ``Transpose`` that is a weight's only reader
    is folded into a transposed initializer, as constant folding would have done; one with other readers
    (a tied table that is also the float head) stays, so the matrix is stored once.
    With ``rows(name)`` (``Checkpoint.iter_rows``) and a streaming ``store`` (:class:`ExternalData`), a
    large untransposed matrix goes to the file row chunk by row chunk: the float32 embeddings of a 7B
    (2.2 GB) are never whole in memory."""
    g = model.graph
    ins = set(io_names(0)[0]) | {i.name for i in g.input if i.name.startswith("past_key_values.")}
    readers: dict[str, list] = {}
    for node in g.node:
        for i in node.input:
            readers.setdefault(i, []).append(node)
    keep, params = [], params or {}
    for inp in list(g.input):
        if inp.name in ins:
            keep.append(inp)
            continue
        users = readers.get(inp.name, [])
        if not users:
            continue
        hf = inp.name
        shape = tuple(d.dim_value for d in inp.type.tensor_type.shape.dim)
        transposed = len(users) == 1 and users[0].op_type == "Transpose"
        if (rows is not None and hasattr(store, "stream") and hf not in params and not transposed
                and len(shape) == 2 and np.prod(shape) * 4 >= getattr(store, "INLINE", 0)):
            g.initializer.append(store.stream(inp.name, shape, np.float32, (c for _, c in rows(hf))))
            continue
        value = np.asarray(params[hf], np.float32) if hf in params else read(hf)
        value = value.reshape(shape)
        if transposed:
            t = users[0]
            perm = list(next(a.ints for a in t.attribute if a.name == "perm"))
            g.initializer.append(store(value.transpose(perm), t.output[0]))
            g.node.remove(t)
        else:
            g.initializer.append(store(value, inp.name))
    del g.input[:]
    g.input.extend(keep)


def linear_of(node) -> str | None:
    """HF module name of a traced linear's MatMul (``/model/model/layers.0/self_attn/q_proj/MatMul``)."""
    if node.op_type != "MatMul" or not node.name.endswith("/MatMul"):
        return None
    path = node.name.strip("/").rsplit("/", 1)[0].split("/")
    if path[:1] == ["model"]:     # the wrapper's attribute
        path = path[1:]
    # a module list that is called itself (an MoE's traced experts) is a scope, and its children are scoped
    # "experts.0" inside it: /mlp/experts/experts.0/gate_proj is mlp.experts.0.gate_proj
    path = [p for k, p in enumerate(path) if not (k + 1 < len(path) and path[k + 1].startswith(p + "."))]
    return ".".join(path) or None


def matmulnbits_arrays(qt: QuantizedTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(B, scales, zero_points)`` for MatMulNBits from a tensor on an integer grid; no zero points when
    symmetric (the operator's default, 2^(bits-1), is the grid's fixed zero point)."""
    t = qt.type
    if not isinstance(t, IntType):
        raise ValueError(f"{qt.name}: {getattr(t, 'name', t)} is not an integer grid")
    if t.per_channel:  # block_size = K would have to be a power of two; the CLI refuses this up front
        raise ValueError(f"{qt.name}: MatMulNBits has no per-channel form ({t.name}); use a grouped grid")
    n, k = qt.shape
    nb = k // t.group
    blocks = qt.data.reshape(n, nb, -1)              # per block: d (f16), z (u8), packed codes
    f = qt.fields()
    b = np.ascontiguousarray(blocks[:, :, 3:])
    scales = f.params["d"].astype(np.float32).reshape(-1)
    if t.sym:
        return b, scales, None
    z = f.params["z"].astype(np.uint8)
    if t.bits == 4:  # two blocks per byte, even block in the low nibble, each row padded to whole bytes
        if nb % 2:
            z = np.concatenate([z, np.full((n, 1), t.zero, np.uint8)], axis=1)
        z = z[:, 0::2] | (z[:, 1::2] << 4)
    return b, scales, np.ascontiguousarray(z.reshape(-1))


def read_matmulnbits(onnx_dir: Path) -> dict[str, QuantizedTensor]:
    """The quantized linears of a written model (``model.onnx`` and its external data in ``onnx_dir``) back
    as QuantizedTensors, by HF weight name: each MatMulNBits' packed codes, scales and zero points are
    exactly the bytes the quantizer produced (the inverse of :func:`matmulnbits_arrays`)."""
    import onnx
    from onnx import numpy_helper

    from quantizers import grids
    m = onnx.load(str(onnx_dir / "model.onnx"))
    init = {i.name: i for i in m.graph.initializer}
    out = {}
    for node in m.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        a = {x.name: x.i for x in node.attribute}
        n, k, bits, g = a["N"], a["K"], a["bits"], a["block_size"]
        nb = k // g
        arr = [numpy_helper.to_array(init[i], str(onnx_dir)) for i in node.input[1:]]
        b, scales = arr[0].reshape(n, nb, -1), arr[1].reshape(n, nb)
        codes = np.stack([b & 15, b >> 4], -1).reshape(n, k) if bits == 4 else b.reshape(n, k)
        t = IntType(bits, g, sym=len(arr) < 3)
        if t.sym:
            z = np.full((n, nb), t.zero, np.uint8)
        else:
            zp = arr[2].reshape(n, -1)
            z = (np.stack([zp & 15, zp >> 4], -1).reshape(n, -1)[:, :nb] if bits == 4 else zp[:, :nb])
        name = node.name.strip("/").rsplit("/", 1)[0].replace("/", ".") + ".weight"
        f = grids.BlockFields(grids.grid(t), codes.astype(np.uint8),
                              {"d": scales.astype(np.float16), "z": z.astype(np.uint8)})
        out[name] = QuantizedTensor.from_fields(name, f)
    return out


def swap_in(model, tensors: dict[str, QuantizedTensor], store=_inline, accuracy_level: int = 4) -> list[str]:
    """Replace the MatMul of every linear in ``tensors`` (HF weight names) by MatMulNBits; return the
    names swapped. Initializers and nodes left unused (the fp weights) are dropped."""
    from onnx import helper
    g = model.graph
    nodes, added, swapped = [], [], []
    for node in g.node:
        lin = linear_of(node)
        qt = tensors.get(f"{lin}.weight") if lin else None
        if qt is None:
            nodes.append(node)
            continue
        b, scales, zp = matmulnbits_arrays(qt)
        release(qt.data)   # a spilled tensor's pages, read once: back to the page cache
        prefix = lin.replace(".", "_")
        names = [f"{prefix}.qweight", f"{prefix}.scales"] + ([f"{prefix}.zero_points"] if zp is not None else [])
        added += [store(a, nm) for a, nm in zip((b, scales, zp), names)]
        # accuracy_level 4: int8 activations, as llama.cpp's quantized dot products. onnxruntime's 8-bit
        # kernel has no fast float path at one token per step (the real 0.5B's int8 lm_head: 2.0 tok/s at
        # level 0), and the int4 kernels gain too: decode 14.7 -> 24.9 tok/s, mean KLD 0.0973 -> 0.1006.
        extra = {"accuracy_level": accuracy_level} if accuracy_level else {}
        nodes.append(helper.make_node("MatMulNBits", [node.input[0], *names], list(node.output),
                                      name=f"/{lin.replace('.', '/')}/MatMulNBits", domain="com.microsoft",
                                      K=qt.shape[1], N=qt.shape[0], bits=qt.type.bits, block_size=qt.type.group,
                                      **extra))
        swapped.append(f"{lin}.weight")
    missing = sorted(set(tensors) - set(swapped))
    if missing:
        raise RuntimeError(f"no MatMul found in the exported graph for {missing[:3]}")
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(added)
    _prune(model)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return swapped


def _prune(model) -> None:
    """Drop nodes whose outputs nobody reads, then initializers nobody reads."""
    g = model.graph
    outputs = {o.name for o in g.output}
    while True:
        used = {i for n in g.node for i in n.input} | outputs
        dead = [n for n in g.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)


def write_onnx(out: Path, model_dir: Path, cfg: ModelConfig, tensors: dict[str, QuantizedTensor],
               params: dict[str, np.ndarray] | None = None, accuracy_level: int = 4) -> list[Path]:
    """Write the model folder into ``out``: ``model.onnx`` + ``model.onnx_data`` (external weights), the
    checkpoint's config/generation config/tokenizer files. ``tensors``: quantized linears (HF weight
    names); ``params``: float tensors that replace the checkpoint's (AWQ-folded norms/biases);
    ``accuracy_level``: MatMulNBits' compute type (4: int8 activations, fast; 0: float activations, the
    dequantized model exactly).
    Everything goes to temp names first and is renamed at the end, the graph last. Returns the paths."""
    import onnx
    tmp = out / f".onnx.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fp = tmp / "fp.onnx"
        export_fp(model_dir, cfg, fp)
        model = onnx.load(str(fp))
        fp.unlink()
        store = ExternalData(tmp / DATA_FILE)
        try:
            swap_in(model, tensors, store, accuracy_level)
            ckpt = Checkpoint(model_dir, cfg)
            bind_weights(model, ckpt.read, params, store, rows=ckpt.iter_rows)
        finally:
            store.close()
        onnx.save_model(model, str(tmp / ONNX_FILE))
        for name in SIDE_FILES:
            if (model_dir / name).is_file():
                shutil.copyfile(model_dir / name, tmp / name)
        _portable_config(tmp / "config.json")
        return publish(tmp, out, ONNX_FILE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, out: Path, last: str) -> list[Path]:
    """Move a finished temp folder's files into ``out``, the graph file ``last`` (a folder whose graph is
    present is complete); return the final paths."""
    final = []
    for p in sorted(tmp.iterdir(), key=lambda p: p.name == last):
        os.replace(p, out / p.name)
        final.append(out / p.name)
    return final


def _portable_config(path: Path) -> None:
    """Give a transformers-5 ``config.json`` the top-level ``rope_theta`` older readers look for.

    transformers 5 moved it into ``rope_parameters``; transformers 4.x (which optimum-onnx requires) then
    silently assumes 10000. The graph has RoPE baked in, but anything that rebuilds the model from the
    config (optimum re-exports, evaluation harnesses) must see the real base."""
    if not path.is_file():
        return
    cfg = json.loads(path.read_text())
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" not in cfg and "rope_theta" in rope and rope.get("rope_type", "default") == "default":
        cfg["rope_theta"] = rope["rope_theta"]
        path.write_text(json.dumps(cfg, indent=2) + "\n")


class Runner:
    """An onnxruntime session over an exported folder's ``model.onnx``."""

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.pasts = [i for i in self.sess.get_inputs() if i.name.startswith("past_key_values.")]
        self.outs = [o.name for o in self.sess.get_outputs()]

    def _run(self, ids: np.ndarray, past: list[np.ndarray] | None, start: int) -> dict[str, np.ndarray]:
        n = start + ids.shape[1]
        feed = {"input_ids": ids, "attention_mask": np.ones((1, n), np.int64),
                "position_ids": np.arange(start, n, dtype=np.int64)[None]}
        for k, i in enumerate(self.pasts):
            feed[i.name] = past[k] if past is not None else np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
        return dict(zip(self.outs, self.sess.run(None, feed)))

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        """Logits [n, vocab] for one sequence, from an empty KV cache."""
        return self._run(np.asarray(tokens, dtype=np.int64)[None], None, 0)["logits"][0]

    def generate(self, ids: list[int], max_tokens: int, stop: set[int]) -> list[int]:
        """Greedy continuation of ``ids`` with the graph's KV cache, up to ``max_tokens`` or a ``stop`` token."""
        cur, past, start, new = np.asarray([ids], np.int64), None, 0, []
        for _ in range(max_tokens):
            res = self._run(cur, past, start)
            nxt = int(res["logits"][0, -1].argmax())
            if nxt in stop:
                break
            new.append(nxt)
            past = [res["present." + i.name.removeprefix("past_key_values.")] for i in self.pasts]
            start += cur.shape[1]
            cur = np.asarray([[nxt]], np.int64)
        return new


@register
class ONNXTarget(FolderTarget):
    """onnxruntime: optimum's ORTModelForCausalLM folder, int4/int8 MatMulNBits weights."""
    # measured with torch 2.13 / onnx 1.23 (tests/test_hybrid.py::test_graph_exporters_cannot_trace_gated_deltanet):
    # transformers' torch Gated DeltaNet solves a unit-triangular system per chunk (torch.linalg.solve_triangular),
    # which torch's ONNX exporter has no mapping for
    hybrid_limitation = ("torch.onnx cannot export transformers' Gated DeltaNet: \"Exporting the operator "
                         "'aten::linalg_solve_triangular' to ONNX opset version 20 is not supported\"")
    name = "onnx"
    runtime = "onnxruntime"
    looks_like = "a folder with model.onnx"
    main_file = ONNX_FILE
    module = "onnx"
    float_head = "float32"

    def check_grid(self, t: IntType) -> None:
        if t.per_channel:
            # MatMulNBits' block_size must be a power of two >= 16 (onnxruntime refuses the session otherwise),
            # and a per-channel block is a whole row: Qwen's rows (896, 4864, ...) are not powers of two
            raise UsageError(f"--quant {t.name}: per-channel grids need --to openvino; onnxruntime's MatMulNBits "
                             "takes power-of-two groups only (INT4_G16..INT4_G256)")

    def write(self, job, linears: dict[str, QuantizedTensor], folded: dict[str, np.ndarray]) -> list[Path]:
        return write_onnx(job.opts.out, job.res.path, job.cfg, linears, folded,
                          accuracy_level=0 if job.opts.float_activations else 4)

    def report_extras(self, job) -> dict:
        return {"opset": "ai.onnx 17 + com.microsoft 1",
                "activations": "float32" if job.opts.float_activations else "int8"}

    @classmethod
    def runner(cls, path: Path, threads: int | None = None) -> Runner:
        return Runner(path / ONNX_FILE, threads)
