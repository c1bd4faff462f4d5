"""OpenVINO IR folders: a stateful Qwen decoder whose linears hold exactly our quantized integers.

Route: the float decoder traced without weights in memory (``exporters.onnx._weightless`` behind the same
flat-signature wrapper the ONNX export uses) and converted by OpenVINO's PyTorch frontend
(:func:`trace_fp`), which keeps attention as OpenVINO's SDPA op; every weight is a graph input until
:func:`bind` replaces it with constants: our codes, scales and zero points in the compressed-weight pattern
NNCF writes and the CPU plugin fuses into one FullyConnected (or Gather for the embeddings),

    Constant u4/u8 (i4/i8 when symmetric) [N, K/g, g] -> Convert -> Subtract(zero point) -> Multiply(scale)
    -> Reshape -> Convert f32 -> MatMul

(per-channel grids: codes [N, K], scales and zero points [N, 1], no Reshape; nothing is re-quantized), or
float values for everything else. Then the KV cache becomes internal state,
as optimum-intel lays it out: ``past_key_values.N.*`` inputs and ``present.N.*`` outputs turn into
variables (OpenVINO's MakeStateful transformation), a ``beam_idx`` input reorders them, and each variable
starts as an empty ``[batch, kv_heads, 0, head_dim]`` tensor. The folder is what ``OVModelForCausalLM``
and ``openvino_genai.LLMPipeline`` load: ``openvino_model.xml/.bin``, config, generation config, tokenizer
files and, when openvino-tokenizers is installed, ``openvino_tokenizer.xml`` / ``openvino_detokenizer.xml``.
Next to quantized weights, float constants (embeddings, norms, a float head) are stored as float16,
OpenVINO's default; a full-precision export stays float32.

The CPU plugin by default quantizes activations on the fly for compressed weights, keeps the KV cache in
u8 and may compute in bf16/f16; ``Runner(precise=True)`` turns all three off so verification compares the
weights alone (``precise=False`` measures what a user gets with the defaults).
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np

from exporters.folder import FolderTarget
from exporters.onnx import SIDE_FILES, io_names, publish
from exporters.target import register
from qcompile.model import ModelConfig
from qcompile.spill import release
from quantizers.grids import IntType
from quantizers.tensor import QuantizedTensor

XML_FILE = "openvino_model.xml"
BIN_FILE = "openvino_model.bin"
PRECISE = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0", "KV_CACHE_PRECISION": "f32"}


def _named(model, name: str):
    """The model input carrying tensor name ``name`` (an OpenVINO port may have several names)."""
    return next(p for p in model.inputs if name in p.get_names())


def make_stateful(model, n_layers: int) -> None:
    """KV cache inputs/outputs -> variables, plus the ``beam_idx`` input that reorders them, plus an
    initial value of the right batch for each variable (optimum-intel's layout)."""
    import openvino as ov
    import openvino.opset13 as ops
    from openvino._offline_transformations import apply_make_stateful_transformation
    ins, outs = io_names(n_layers)
    beam = ops.parameter(ov.PartialShape([-1]), ov.Type.i32, name="beam_idx")
    beam.output(0).set_names({"beam_idx"})
    for name in ins[3:]:
        port = _named(model, name)
        readers = list(port.get_target_inputs())
        reordered = ops.gather(port, beam, ops.constant(np.int64(0)))
        for r in readers:
            r.replace_source_output(reordered.output(0))
    model.add_parameters([beam])
    apply_make_stateful_transformation(model, dict(zip(ins[3:], outs[1:])))
    batch = ops.gather(ops.shape_of(_named(model, "input_ids"), "i64"), ops.constant(np.array([0], np.int64)),
                       ops.constant(np.int64(0)))
    for op in model.get_ops():
        if op.get_type_name() == "ReadValue":
            dims = [d.get_length() if d.is_static else 0 for d in op.get_output_partial_shape(0)]
            shape = ops.concat([batch, ops.constant(np.array(dims[1:], np.int64))], 0)
            op.set_arguments([ops.broadcast(ops.constant(np.float32(0)), shape).output(0)])
    model.validate_nodes_and_infer_types()


def _tokenizers(model_dir: Path, out: Path) -> list[str]:
    """openvino_tokenizer.xml / openvino_detokenizer.xml when openvino-tokenizers is installed (optional:
    optimum-intel's pipeline does without; openvino_genai needs them)."""
    try:
        import openvino as ov
        from openvino_tokenizers import convert_tokenizer
        from transformers import AutoTokenizer
    except ImportError:
        return []
    tok, detok = convert_tokenizer(AutoTokenizer.from_pretrained(model_dir), with_detokenizer=True)
    ov.save_model(tok, str(out / "openvino_tokenizer.xml"))
    ov.save_model(detok, str(out / "openvino_detokenizer.xml"))
    return ["openvino_tokenizer.xml", "openvino_detokenizer.xml"]


def trace_fp(model_dir: Path, cfg: ModelConfig):
    """The float decoder as an OpenVINO model, converted by OpenVINO's PyTorch frontend from a TorchScript
    trace of the weightless transformers model (``exporters.onnx._weightless``: no weights in memory).

    The PyTorch frontend, unlike the ONNX one, maps ``scaled_dot_product_attention`` to OpenVINO's own SDPA
    op, which the CPU plugin fuses with the stateful KV cache (and RoPE, RMSNorm) as it does for
    optimum-intel's export: on the real 0.5B, the ONNX-frontend graph decoded at half NNCF's speed. Every
    parameter is a graph input named by its HF name (tied ones once); :func:`bind` replaces them."""
    import warnings

    import openvino as ov
    import torch

    from exporters.onnx import _weightless, _wrapper, trace_inputs
    model = _weightless(model_dir, cfg)
    weights, args = trace_inputs(model, cfg)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python control flow on shapes
        # check_trace off: re-tracing to compare graphs would fail on the fresh module types, and costs time
        traced = torch.jit.trace(_wrapper(model, list(weights)), args, check_trace=False, strict=False)
        om = ov.convert_model(traced, example_input=args)
    ins, outs = io_names(cfg.num_layers)
    names = ins + list(weights)
    if len(om.inputs) != len(names) or len(om.outputs) != len(outs):
        raise RuntimeError(f"traced graph has {len(om.inputs)} inputs / {len(om.outputs)} outputs, "
                           f"expected {len(names)} / {len(outs)}")
    for port, name in zip(om.inputs, names):  # friendly names too: openvino_genai's paged-attention
        port.get_tensor().set_names({name})     # rewrite finds inputs by them
        port.get_node().set_friendly_name(name)
    for port, name in zip(om.outputs, outs):
        port.get_tensor().set_names({name})
    # the trace leaves every KV-cache dimension dynamic; with the head count and head size static, the
    # plugin sees the GQA broadcast of keys/values as [?, heads, ?, head_dim] and picks its fused kernels
    kv = ov.PartialShape([-1, cfg.num_kv_heads, -1, cfg.head_dim])
    om.reshape({name: kv for name in ins[3:]})
    additive_masks(om)
    return om


def additive_masks(model) -> None:
    """Give every SDPA an additive float mask (0 / float32 min) instead of transformers' boolean one, as
    optimum-intel's export does: the CPU plugin's fused SDPA-with-KV-cache kernel is ~9x slower with a
    boolean mask (real 0.5B, decode: 160 ms vs 18 ms of attention per 16 steps under PERF_COUNT)."""
    import openvino as ov
    import openvino.opset13 as ops
    floats: dict = {}
    for op in model.get_ops():
        if op.get_type_name() != "ScaledDotProductAttention" or op.get_input_size() < 4:
            continue
        port = op.input(3)
        src = port.get_source_output()
        if src.get_element_type() != ov.Type.boolean:
            continue
        key = (src.get_node().get_friendly_name(), src.get_index())
        if key not in floats:  # one conversion per mask, shared by every layer reading it
            floats[key] = ops.select(src, ops.constant(np.float32(0)),
                                     ops.constant(np.finfo(np.float32).min)).output(0)
        port.replace_source_output(floats[key])
    model.validate_nodes_and_infer_types()


ROW_CHUNK_BYTES = 64 << 20   # codes unpacked at a time while packing a tensor for the IR


def _alloc(shape: tuple[int, ...], dtype) -> np.ndarray:
    return np.empty(shape, dtype)


def _packed_codes(qt: QuantizedTensor, shape: tuple[int, ...], alloc) -> tuple[np.ndarray, dict]:
    """``qt``'s codes in OpenVINO's layout for ``shape`` (its [N, ...] view): signed around the zero point
    for a symmetric grid, 4-bit codes two to a byte with the first in the low nibble (OpenVINO's u4/i4),
    written into ``alloc(shape, dtype)`` a row chunk at a time (the unpacked codes of a 7B head are 0.5 GB;
    of a chunk, 64 MB). Returns the array and the per-block scales/zero points ([N, ...] flattened)."""
    t = qt.type
    n, k = qt.shape
    packed_shape = shape[:-1] + (shape[-1] // 2 if t.bits == 4 else shape[-1],)
    out = alloc(packed_shape, np.int8 if t.sym and t.bits == 8 else np.uint8)
    params: dict[str, list] = {}
    step = max(1, ROW_CHUNK_BYTES // max(1, k))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        f = QuantizedTensor(qt.name, t, (r1 - r0, k), qt.data[r0:r1]).fields()
        codes = f.codes.reshape((r1 - r0,) + shape[1:])
        if t.sym:  # subtract in int16: 8-bit codes reach 255 and the zero point is 128, neither fits int8
            codes = (codes.astype(np.int16) - t.zero).astype(np.int8)
        if t.bits == 4:
            nib = codes.astype(np.uint8) & 0xF
            codes = nib[..., 0::2] | (nib[..., 1::2] << 4)
        out[r0:r1] = codes
        # a spill's pages, written (codes) or read (the quantized blocks): page cache, not our resident set
        release(out)
        release(qt.data)
        for key, v in f.params.items():
            params.setdefault(key, []).append(v)
    if hasattr(out, "flush"):
        out.flush()
    params = {key: np.concatenate(v) for key, v in params.items()}   # views into qt.data: reads every page
    release(qt.data)
    return out, params


def decompressed(qt: QuantizedTensor, alloc=_alloc):
    """Our integers as OpenVINO's compressed-weight pattern, the one NNCF writes and the CPU plugin fuses
    into its FullyConnected / Gather kernels:

        Constant i4|i8 (symmetric) or u4|u8 [N, K/g, g] -> Convert f16 [-> Subtract(Constant u4|u8 zero
        points [N, K/g, 1] -> Convert f16)] -> Multiply(Constant f16 scales [N, K/g, 1]) -> Reshape [N, K]
        -> Convert f32

    A per-channel grid is NNCF's ``group_size=-1`` layout: codes [N, K], scales and zero points [N, 1],
    and no Reshape. The codes, scales and zero points are the stored bytes of ``qt``; nothing is rounded
    again. The codes Constant shares the packed array made by ``alloc(shape, dtype)`` instead of copying
    it: with a memory map on disk (:meth:`qcompile.spill.Spill.empty`) the whole model's codes are never
    in anonymous memory while the IR is built and saved."""
    import openvino as ov
    import openvino.opset13 as ops
    t = qt.type
    if not isinstance(t, IntType):
        raise ValueError(f"{qt.name}: {getattr(t, 'name', t)} is not an integer grid")
    n, k = qt.shape
    # grouped: one axis per group, so scales broadcast over [N, K/g, g]; per-channel: over [N, K]
    shape = (n, k) if t.per_channel else (n, k // t.group, t.group)
    per_block = shape[:-1] + (1,)
    packed, params = _packed_codes(qt, shape, alloc)
    if t.sym:  # signed codes around the fixed zero point: no Subtract, as NNCF's symmetric modes
        typ = ov.Type.i4 if t.bits == 4 else ov.Type.i8
    else:
        typ = ov.Type.u4 if t.bits == 4 else ov.Type.u8
    # shared only with an allocator that keeps the array alive (a Spill); else the Constant copies it
    codes = ov.op.Constant(ov.Tensor(packed, ov.Shape(list(shape)), typ), shared_memory=alloc is not _alloc)
    codes.set_friendly_name(f"{qt.name}/codes")   # named after the HF tensor: the IR audits weight by weight
    w = ops.convert(codes, ov.Type.f16)
    if not t.sym:
        z = ops.constant(params["z"].astype(np.uint8).reshape(per_block), typ, name=f"{qt.name}/zero_points")
        w = ops.subtract(w, ops.convert(z, ov.Type.f16))
    d = ops.constant(params["d"].astype(np.float16).reshape(per_block), name=f"{qt.name}/scales")
    w = ops.multiply(w, d)
    if not t.per_channel:
        w = ops.reshape(w, ops.constant(np.array([n, k], np.int64)), False)
    return ops.convert(w, ov.Type.f32).output(0)


def bind(model, names: list[str], tensors: dict[str, QuantizedTensor], read,
         params: dict[str, np.ndarray] | None = None, tied: tuple[str, str] | None = None, alloc=_alloc) -> None:
    """Replace each weight input (``names``) by constants: a quantized tensor where ``tensors`` has one
    (``tied``: the (embeddings, head) names of a tied table: its lookup reads the first, its head the second), else the
    float value, ``params[name]`` (AWQ-folded norms/biases) or ``read(name)`` from the checkpoint, stored
    once however many nodes read it."""
    import openvino.opset13 as ops
    params = params or {}
    used = set()
    for name in names:
        port = _named(model, name)
        fp = None
        for target in list(port.get_target_inputs()):
            key = name
            if tied and name == tied[0] and target.get_node().get_type_name() != "Gather":
                key = tied[1]   # the tied head's MatMul
            qt = tensors.get(key)
            if qt is not None:
                used.add(key)
                src = decompressed(qt, alloc)
            else:
                if fp is None:
                    value = np.asarray(params[name], np.float32) if name in params else read(name)
                    fp = ops.constant(np.ascontiguousarray(value, np.float32)).output(0)
                src = fp
            target.replace_source_output(src)
        model.remove_parameter(port.get_node())
    missing = sorted(set(tensors) - used)
    if missing:
        raise RuntimeError(f"no reader of {missing[:3]} in the traced graph")
    model.validate_nodes_and_infer_types()


def stable_names(model) -> None:
    """Number the nodes OpenVINO named itself (``Convert_40324``: a process-wide counter, so the same export gave
    other names after other work in the process) per type in graph order, so the same model gives the same XML."""
    import re
    seen: dict[str, int] = {}
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if re.fullmatch(rf"{re.escape(kind)}_\d+", op.get_friendly_name()):
            seen[kind] = seen.get(kind, -1) + 1
            op.set_friendly_name(f"{kind}_{seen[kind]}")


def write_openvino(out: Path, model_dir: Path, cfg: ModelConfig, tensors: dict[str, QuantizedTensor],
                   params: dict[str, np.ndarray] | None = None) -> list[Path]:
    """Write the IR folder into ``out`` (temp names first, ``openvino_model.xml`` renamed last). ``tensors``:
    quantized linears (HF weight names; ``lm_head.weight`` for a quantized head, tied or not) and the input
    embeddings (``model.embed_tokens.weight``) when they are on an integer grid too; ``params``: float
    tensors that replace the checkpoint's (AWQ-folded norms/biases). Float constants are stored as
    float16 next to quantized weights (OpenVINO's default; the scales are float16 values already), float32
    in a full-precision export (bf16 weights below float16's normal range would lose bits). Returns the
    paths."""
    import openvino as ov

    from exporters.onnx import _portable_config
    from qcompile.model import Checkpoint
    from qcompile.spill import Spill
    tmp = out / f".openvino.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        # the packed codes the graph's Constants share wait on disk, memory-mapped, until the IR is saved
        with Spill(out / f".openvino.{os.getpid()}.codes") as codes:
            model = trace_fp(model_dir, cfg)
            names = [p.get_any_name() for p in model.inputs][3 + 2 * cfg.num_layers:]
            bind(model, names, tensors, Checkpoint(model_dir, cfg).read, params,
                 (cfg.embed_name, cfg.head_name) if cfg.tie_word_embeddings else None, alloc=codes.empty)
            make_stateful(model, cfg.num_layers)
            stable_names(model)
            with codes.trimmed():
                ov.save_model(model, str(tmp / XML_FILE), compress_to_fp16=bool(tensors))
            del model
        for name in SIDE_FILES:
            if (model_dir / name).is_file():
                shutil.copyfile(model_dir / name, tmp / name)
        _portable_config(tmp / "config.json")
        try:
            _tokenizers(model_dir, tmp)
        except Exception as e:  # the tokenizer converter raises its own types; the IR is still usable
            print(f"note: openvino-tokenizers could not convert the tokenizer ({e}); skipped", file=sys.stderr)
        return publish(tmp, out, XML_FILE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class Runner:
    """An OpenVINO CPU infer request over an IR folder's stateful model."""

    def __init__(self, folder: Path, threads: int | None = None, precise: bool = True):
        import openvino as ov
        config = dict(PRECISE) if precise else {}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = ov.Core().compile_model(str(folder / XML_FILE), "CPU", config)
        self.request = self.compiled.create_infer_request()

    def _run(self, ids: np.ndarray, start: int) -> np.ndarray:
        n = start + ids.shape[1]
        self.request.infer({"input_ids": ids, "attention_mask": np.ones((1, n), np.int64),
                            "position_ids": np.arange(start, n, dtype=np.int64)[None],
                            "beam_idx": np.zeros(1, np.int32)})
        return self.request.get_tensor("logits").data[0]

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        """Logits [n, vocab] for one sequence, from an empty KV cache."""
        self.request.reset_state()
        return self._run(np.asarray(tokens, np.int64)[None], 0).copy()

    def generate(self, ids: list[int], max_tokens: int, stop: set[int]) -> list[int]:
        """Greedy continuation of ``ids`` with the KV cache, up to ``max_tokens`` or a ``stop`` token."""
        self.request.reset_state()
        cur, start, new = np.asarray([ids], np.int64), 0, []
        for _ in range(max_tokens):
            nxt = int(self._run(cur, start)[-1].argmax())
            if nxt in stop:
                break
            new.append(nxt)
            start += cur.shape[1]
            cur = np.asarray([[nxt]], np.int64)
        return new


@register
class OpenVINOTarget(FolderTarget):
    """OpenVINO: an IR folder (OVModelForCausalLM / openvino_genai layout, stateful KV cache), u4/u8 weights,
    the input embeddings 8-bit as NNCF stores them."""
    # measured with openvino 2026.4 (tests/test_hybrid.py::test_graph_exporters_cannot_trace_gated_deltanet)
    hybrid_limitation = ("OpenVINO's PyTorch frontend cannot convert transformers' Gated DeltaNet: \"No conversion "
                         "rule found for operations: aten::linalg_solve_triangular\"")
    name = "openvino"
    runtime = "openvino"
    looks_like = "a folder with openvino_model.xml"
    main_file = XML_FILE
    module = "openvino"
    quantized_embeddings = True

    def write(self, job, linears: dict[str, QuantizedTensor], folded: dict[str, np.ndarray]) -> list[Path]:
        return write_openvino(job.opts.out, job.res.path, job.cfg, linears, folded)

    def report_extras(self, job) -> dict:
        import openvino
        return {"openvino": openvino.__version__,
                "verified_with": "CPU plugin, f32 inference, no dynamic activation quantization, f32 KV cache"}

    @classmethod
    def runner(cls, path: Path, threads: int | None = None) -> Runner:
        return Runner(path, threads)
