"""The layer-by-layer calibration engine.

Calibration tokens are embedded once. Then, for each decoder layer: load only that layer's weights,
run it in full precision over the calibration activations while hooks accumulate each linear's input
Hessian ``X^T X`` (shared by q/k/v and by gate/up; only for methods that need it, else its diagonal),
for AWQ search channel scales and fold them into the norms/linears, quantize its linears with the
chosen method, load the quantized values back and run the layer again to produce the next layer's
inputs (so later layers see, and compensate, earlier layers' errors). Peak memory: one layer, its Hessians and the
activations. Finished layers are checkpointed so an interrupted run resumes where it stopped. Each quantized
tensor's reconstruction error (against the weights it was quantized from: AWQ-folded when AWQ runs) is kept in
:attr:`LayerwiseEngine.errors` and checkpointed with its layer.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType as T

from qcompile.arch import ModelConfig
from qcompile.evaluate import CheckpointSource, StreamedDecoder
from quantizers import CalibStats, Method
from quantizers.error import ErrorTally
from quantizers.grids import Target, parse_type
from quantizers.tensor import QuantizedTensor

# linear module (relative to the layer) -> the module whose input statistics it uses
LINEARS = {
    "self_attn.q_proj": "self_attn.q_proj", "self_attn.k_proj": "self_attn.q_proj",
    "self_attn.v_proj": "self_attn.q_proj", "self_attn.o_proj": "self_attn.o_proj",
    "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.gate_proj", "mlp.down_proj": "mlp.down_proj",
}

# AWQ scale groups: (producer of the input, input statistics, consumers). Dividing the producer's output
# channels (a norm's weight, or a linear's rows and bias) by s and multiplying the consumers' input
# columns by s leaves the full-precision layer unchanged.
SCALE_GROUPS = [
    ("input_layernorm", "self_attn.q_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", "mlp.gate_proj", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", "mlp.down_proj", ("mlp.down_proj",)),
    # only without GQA: under GQA one v channel feeds several heads of o, which would need tied scales
    # (AutoAWQ skips this pair for the same reason)
    ("self_attn.v_proj", "self_attn.o_proj", ("self_attn.o_proj",)),
]
AWQ_TOKENS = 2048   # calibration tokens kept per input for AWQ's scale search


@dataclass
class Stats:
    """Accumulated input statistics of one linear group."""
    sq: np.ndarray                  # float64 [in], sum of x^2 (llama.cpp's imatrix, unnormalised)
    abs: np.ndarray                 # float64 [in], sum of |x| (AWQ's activation scale)
    hessian: "object" = None        # float32 [in, in] sum of x x^T (numpy on CPU, torch elsewhere) or None
    sample_every: int = 0           # keep every n-th token for AWQ (0: none)
    samples: list = field(default_factory=list)
    tokens: int = 0

    def add(self, x) -> None:
        """Accumulate a batch of inputs x [tokens, in]."""
        xf = x.float()
        self.sq += xf.square().sum(0).double().cpu().numpy()
        self.abs += xf.abs().sum(0).double().cpu().numpy()
        if self.hessian is not None:
            # f32 products: bf16 partial sums break positive-definiteness of the near-singular Hessians
            # (o_proj's input under GQA has eigenvalues far below bf16's resolution)
            if isinstance(self.hessian, np.ndarray):
                xn = xf.cpu().numpy()  # NumPy recognises a.T @ a and calls BLAS syrk: half the FLOPs
                self.hessian += xn.T @ xn
            else:
                self.hessian.addmm_(xf.T, xf)
        if self.sample_every:
            self.samples.append(x[::self.sample_every].to("cpu", copy=True))
        self.tokens += x.shape[0]

    def calib(self) -> CalibStats:
        n = max(1, self.tokens)
        h = None
        if self.hessian is not None:
            h = self.hessian if isinstance(self.hessian, np.ndarray) else self.hessian.cpu().numpy()
            h = (h / n).astype(np.float32)
        return CalibStats(h, (self.sq / n).astype(np.float32))


class LayerwiseEngine:
    """Produces the quantized linears of each layer in order (call :meth:`layer` with 0, 1, 2, ...)."""

    def __init__(self, cfg: ModelConfig, source: CheckpointSource, tokens: np.ndarray,
                 types: dict[str, Target], method: Method, *, device: str = "cpu", batch: int = 8,
                 work_dir: Path | None = None, fingerprint: str = "", resume: bool = False,
                 dtype: str = "bfloat16", progress: Callable[[int], None] = lambda i: None):
        import torch
        self.torch, self.cfg, self.source, self.types, self.method = torch, cfg, source, types, method
        # Layers run in bf16 (3x the matmul throughput of f32 on CPUs with AVX512-BF16/AMX, and the usual
        # choice of GPTQ tools on GPUs); the residual stream between layers and the Hessian sums stay f32.
        self.dtype = getattr(torch, dtype)
        self.device, self.batch, self.progress = device, batch, progress
        self.dec = StreamedDecoder(cfg)
        self.work = work_dir
        self.fingerprint = fingerprint
        self.done = -1          # last layer whose outputs are in self.hidden
        self.hidden = None
        self.tokens = tokens
        self.errors = ErrorTally()  # per HF tensor name, for report.json
        if self.work is not None:
            if resume and self._load_state():
                return
            shutil.rmtree(self.work, ignore_errors=True)
            self.work.mkdir(parents=True)
            (self.work / "fingerprint").write_text(fingerprint)

    # ---- resume ---------------------------------------------------------------------------------
    def _load_state(self) -> bool:
        state = self.work / "state.json"
        if not state.is_file() or (self.work / "fingerprint").read_text() != self.fingerprint:
            return False
        self.done = json.loads(state.read_text())["layer"]
        self.hidden = self.torch.load(self.work / "hidden.pt").to(self.device)
        return True

    def _save(self, i: int, tensors: dict[str, QuantizedTensor]) -> None:
        if self.work is None:
            return
        arrays = {f"{k}|{q.type.name}|{q.shape[0]}|{q.shape[1]}": q.data for k, q in tensors.items()}
        tmp = self.work / f".layer-{i:03d}.npz"
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, self.work / f"layer-{i:03d}.npz")
        errors = {k: self.errors.sums(k) for k in tensors if self.errors.sums(k) is not None}
        (self.work / f".errors-{i:03d}.json").write_text(json.dumps(errors))
        os.replace(self.work / f".errors-{i:03d}.json", self.work / f"errors-{i:03d}.json")
        self.torch.save(self.hidden.cpu(), self.work / ".hidden.pt")
        os.replace(self.work / ".hidden.pt", self.work / "hidden.pt")
        (self.work / ".state.json").write_text(json.dumps({"layer": i}))
        os.replace(self.work / ".state.json", self.work / "state.json")

    def _load_layer(self, i: int) -> dict[str, QuantizedTensor]:
        out = {}
        with np.load(self.work / f"layer-{i:03d}.npz") as z:
            for key in z.files:
                name, typ, r, c = key.split("|")
                out[name] = QuantizedTensor(name, parse_type(typ), (int(r), int(c)), z[key])
        errors = self.work / f"errors-{i:03d}.json"
        if errors.is_file():  # absent in checkpoints written before errors were measured: no error then
            for name, sums in json.loads(errors.read_text()).items():
                self.errors.put(name, sums)
        return out

    def finish(self) -> None:
        if self.work is not None:
            shutil.rmtree(self.work, ignore_errors=True)

    # ---- the engine -------------------------------------------------------------------------------
    def layer(self, i: int) -> dict[str, QuantizedTensor]:
        """Quantized linears of layer ``i``, keyed by HF tensor name."""
        if i <= self.done:
            return self._load_layer(i)
        if i != self.done + 1:
            raise RuntimeError(f"layers must be requested in order (asked {i}, next is {self.done + 1})")
        torch = self.torch
        if self.hidden is None:
            self.hidden = self.dec.embed(self.source, self.tokens).to(self.device)
        module = self.dec.build_layer(i, self.source, self.device).to(self.dtype)
        stats = self._collect(module)
        prefix = f"model.layers.{i}."
        # full precision, not the bf16 copies inside the module
        weights = {lin: self.source.full(f"{prefix}{lin}.weight") for lin in LINEARS}
        calib = {k: st.calib() for k, st in stats.items()}
        fp: dict[str, np.ndarray] = {}     # folded norms/biases, exported instead of the checkpoint's
        if self.method.awq:
            fp = self._awq(prefix, module, stats, weights, calib)
        out = self._quantize(prefix, weights, calib)
        for name, v in fp.items():
            out[name] = QuantizedTensor(name, T.F32, (1, v.size), v.reshape(1, -1).astype(np.float32))
        quantized_from = {f"{prefix}{lin}.weight": w for lin, w in weights.items()} | fp
        with torch.no_grad():
            for name, qt in out.items():
                deq = qt.dequantize()
                self.errors.add(name, quantized_from[name], qt, deq)
                tensor = module.get_parameter(name[len(prefix):])
                tensor.copy_(torch.from_numpy(deq).reshape(tensor.shape).to(self.device))
        self.hidden = self._run(module)
        self.done = i
        self._save(i, out)
        self.progress(i)
        return out

    def _quantize(self, prefix: str, weights: dict[str, np.ndarray], calib: dict[str, CalibStats]
                  ) -> dict[str, QuantizedTensor]:
        """Quantize the layer's linears. Those that share input statistics and target type (q/k/v, gate/up)
        are stacked into one matrix: every method here treats rows independently given the statistics, so
        this changes nothing but the cost (GPTQ factors each Hessian once and sweeps its columns once)."""
        groups: dict[tuple, list[str]] = {}
        for lin, stat_of in LINEARS.items():
            groups.setdefault((stat_of, self.types[f"{prefix}{lin}.weight"]), []).append(lin)
        parts: dict[str, QuantizedTensor] = {}
        for (stat_of, target), lins in groups.items():
            w = np.concatenate([weights[lin] for lin in lins]) if len(lins) > 1 else weights[lins[0]]
            q = self.method.quantize("+".join(f"{prefix}{lin}.weight" for lin in lins), w, target, calib[stat_of])
            r0 = 0
            for lin in lins:
                n = weights[lin].shape[0]
                parts[lin] = QuantizedTensor(f"{prefix}{lin}.weight", q.type, (n, q.shape[1]), q.data[r0:r0 + n])
                r0 += n
        return {f"{prefix}{lin}.weight": parts[lin] for lin in LINEARS}

    def _awq(self, prefix: str, module, stats: dict[str, Stats], weights: dict[str, np.ndarray],
             calib: dict[str, CalibStats]) -> dict[str, np.ndarray]:
        """Search AWQ scales for each group, fold them into ``weights`` and the producers, and rescale
        the statistics to the folded inputs. Returns the folded producer norms/biases by tensor name."""
        from quantizers import awq
        scales = {}
        for producer, stat_of, consumers in SCALE_GROUPS:
            if not foldable(producer, consumers, weights):
                continue
            st = stats[stat_of]
            pairs = [(weights[c], self.types[f"{prefix}{c}.weight"]) for c in consumers]
            scales[producer], _gain = awq.search_scales(self.torch.cat(st.samples), st.abs / st.tokens, pairs)
            st.samples.clear()
            calib[stat_of] = calib[stat_of].scaled(scales[producer])
        present = set(self.cfg.layer_tensor_names(int(prefix.split(".")[2])))
        params = {rel: self.source.full(prefix + rel).astype(np.float32) for rel in producer_params(scales)
                  if prefix + rel in present}
        fold(scales, weights, params)
        return {prefix + rel: v for rel, v in params.items()}

    def _run(self, module):
        """The layer over all calibration activations, batch by batch, in the engine dtype; f32 out."""
        outs = [self.dec.run_layer(module, self.hidden[b:b + self.batch].to(self.dtype)).float()
                for b in range(0, self.hidden.shape[0], self.batch)]
        return self.torch.cat(outs)

    def _collect(self, module) -> dict[str, Stats]:
        torch = self.torch
        stats: dict[str, Stats] = {}
        hooks = []
        n_tokens = int(np.prod(self.hidden.shape[:2]))
        for name in set(LINEARS.values()):
            lin = module.get_submodule(name)
            n = lin.in_features
            hessian = None
            if self.method.hessian:
                hessian = np.zeros((n, n), np.float32) if self.device == "cpu" else \
                    torch.zeros(n, n, device=self.device)
            stats[name] = Stats(np.zeros(n), np.zeros(n), hessian,
                                max(1, n_tokens // AWQ_TOKENS) if self.method.awq else 0)

            def hook(_mod, inputs, name=name):
                stats[name].add(inputs[0].reshape(-1, inputs[0].shape[-1]))
            hooks.append(lin.register_forward_pre_hook(hook))
        try:
            self._run(module)
        finally:
            for h in hooks:
                h.remove()
        return stats


def foldable(producer: str, consumers: tuple[str, ...], weights: dict[str, np.ndarray]) -> bool:
    """False for v -> o under GQA (v's rows do not map one-to-one onto o's columns)."""
    return producer not in weights or weights[producer].shape[0] == weights[consumers[0]].shape[1]


def producer_params(scales: dict[str, np.ndarray]) -> list[str]:
    """The non-linear tensors (relative names) that folding ``scales`` changes: norms' weights, biases."""
    return [f"{p}.bias" if p in LINEARS else f"{p}.weight" for p in scales]


def fold(scales: dict[str, np.ndarray], weights: dict[str, np.ndarray], params: dict[str, np.ndarray]) -> None:
    """Fold AWQ scales (by producer) into a layer, in place, leaving its full-precision function unchanged.

    ``weights``: linear (relative name) -> [out, in]; ``params``: norms' weights and biases by relative
    name. Consumers' input columns are multiplied by ``s``, the producer's output channels divided by it.
    """
    for producer, _stat, consumers in SCALE_GROUPS:
        s = scales.get(producer)
        if s is None or not foldable(producer, consumers, weights):
            continue
        for c in consumers:
            weights[c] = weights[c] * s[None, :]
        if producer in weights:
            weights[producer] = weights[producer] / s[:, None]
            if f"{producer}.bias" in params:
                params[f"{producer}.bias"] = params[f"{producer}.bias"] / s
        else:
            params[f"{producer}.weight"] = params[f"{producer}.weight"] / s


def fingerprint(*parts: object) -> str:
    """A short hash of everything a resumed run must share with the interrupted one."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else repr(p).encode())
    return h.hexdigest()[:16]
