"""OpenVINO IR folders: a stateful Qwen decoder whose linears hold exactly our quantized integers.

Route: our ONNX graph (``exporters.onnx``: the float decoder traced by ``torch.onnx.export``, each quantized
linear a ``com.microsoft::MatMulNBits`` with our packed codes, scales and zero points) -> OpenVINO's own
ONNX frontend (``openvino.convert_model``), which turns every MatMulNBits into the compressed-weight
pattern the CPU plugin fuses into one FullyConnected:

    Constant u4/u8 [N, K/g, g] -> Convert -> Subtract(zero point) -> Multiply(scale) -> Reshape -> MatMul

(the pattern NNCF writes too; nothing is re-quantized). Then the KV cache becomes internal state, as
optimum-intel lays it out: ``past_key_values.N.*`` inputs and ``present.N.*`` outputs turn into variables
(OpenVINO's MakeStateful transformation), a ``beam_idx`` input reorders them, and each variable starts as
an empty ``[batch, kv_heads, 0, head_dim]`` tensor. The folder is what ``OVModelForCausalLM`` and
``openvino_genai.LLMPipeline`` load: ``openvino_model.xml/.bin``, config, generation config, tokenizer files
and, when openvino-tokenizers is installed, ``openvino_tokenizer.xml`` / ``openvino_detokenizer.xml``.
Next to quantized weights, float constants (embeddings, norms, a float head, the scales, which are float16
values already) are stored as float16, OpenVINO's default; a full-precision export stays float32.

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

from exporters.onnx import ONNX_FILE, SIDE_FILES, io_names, publish, write_onnx
from qcompile.arch import ModelConfig
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


EMBEDDINGS = "model.embed_tokens.weight"


def compress_embeddings(model, qt: QuantizedTensor) -> None:
    """Feed the embedding lookup from our 8-bit table: the float ``[vocab, hidden]`` constant under the
    Gather becomes ``u8 [vocab, hidden/g, g] -> Convert -> Subtract(zero point) -> Multiply(scale) ->
    Reshape``, the decompression pattern NNCF writes for embeddings (ONNX has no such lookup that
    OpenVINO's frontend reads, so this one piece of surgery happens on the OpenVINO graph)."""
    import openvino as ov
    import openvino.opset13 as ops
    from exporters.onnx import matmulnbits_arrays
    t = qt.type
    n, k = qt.shape
    table = None
    for op in model.get_ops():
        if op.get_type_name() != "Gather":
            continue
        src = op.input(0).get_source_output().get_node()
        if src.get_type_name() == "Constant" and list(src.get_output_shape(0)) == [n, k]:
            table = op.input(0)
            break
    if table is None:
        raise RuntimeError(f"no embedding Gather over a [{n}, {k}] constant in the graph")
    if t.bits != 8:
        raise ValueError(f"embeddings are stored 8-bit, not {t.name}")
    b, scales, _ = matmulnbits_arrays(qt)
    nb = k // t.group
    w = ops.convert(ops.constant(b.reshape(n, nb, t.group), ov.Type.u8), ov.Type.f32)
    z = np.float32(t.zero) if t.sym else qt.fields().params["z"].astype(np.uint8).reshape(n, nb, 1)
    w = ops.subtract(w, ops.constant(z) if t.sym else ops.convert(ops.constant(z, ov.Type.u8), ov.Type.f32))
    d = ops.convert(ops.constant(scales.reshape(n, nb, 1).astype(np.float16)), ov.Type.f32)
    w = ops.reshape(ops.multiply(w, d), ops.constant(np.array([n, k], np.int64)), False)
    table.replace_source_output(w.output(0))
    model.validate_nodes_and_infer_types()


def convert_folder(onnx_dir: Path, out: Path, n_layers: int, compress_to_fp16: bool = True,
                   embeddings: QuantizedTensor | None = None) -> None:
    """An ONNX folder written by :func:`exporters.onnx.write_onnx` -> ``openvino_model.xml/.bin`` (stateful)
    in ``out`` plus its config and tokenizer files. The same weights, byte for byte: the frontend maps
    MatMulNBits' packed codes, scales and zero points onto OpenVINO's compressed-weight constants.
    ``compress_to_fp16``: store the float constants as float16 (next to quantized weights; a
    full-precision model stays float32, since bf16 weights below float16's normal range would lose bits)."""
    import openvino as ov
    model = ov.convert_model(str(onnx_dir / ONNX_FILE))
    if embeddings is not None:
        compress_embeddings(model, embeddings)
    make_stateful(model, n_layers)
    ov.save_model(model, str(out / XML_FILE), compress_to_fp16=compress_to_fp16)
    for name in SIDE_FILES:
        if (onnx_dir / name).is_file():
            shutil.copyfile(onnx_dir / name, out / name)


def write_openvino(out: Path, model_dir: Path, cfg: ModelConfig, tensors: dict[str, QuantizedTensor],
                   params: dict[str, np.ndarray] | None = None) -> list[Path]:
    """Write the IR folder into ``out`` (temp names first, ``openvino_model.xml`` renamed last); same
    arguments as :func:`exporters.onnx.write_onnx`, and ``tensors`` may also hold the input embeddings
    (``model.embed_tokens.weight``) on an integer grid. Returns the paths."""
    tmp = out / f".openvino.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        linears = {n: q for n, q in tensors.items() if n != EMBEDDINGS}
        write_onnx(tmp / "onnx", model_dir, cfg, linears, params, accuracy_level=0)  # OpenVINO has its own
        convert_folder(tmp / "onnx", tmp, cfg.num_layers, compress_to_fp16=bool(tensors),
                       embeddings=tensors.get(EMBEDDINGS))
        shutil.rmtree(tmp / "onnx")
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
