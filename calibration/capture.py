"""The layer-by-layer calibration engine.

Calibration tokens are embedded once. Then, for each decoder layer: load only that layer's weights,
run it in full precision over the calibration activations while hooks accumulate each linear's input
Hessian ``X^T X`` (shared by q/k/v and by gate/up), quantize its linears with the chosen method, load
the quantized values back and run the layer again to produce the next layer's inputs (so later layers
see, and compensate, earlier layers' errors). Peak memory: one layer, its Hessians and the
activations. Finished layers are checkpointed so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType as T

from qcompile.arch import ModelConfig
from qcompile.evaluate import CheckpointSource, StreamedDecoder
from quantizers import CalibStats, Method
from quantizers.tensor import QuantizedTensor

# linear module (relative to the layer) -> the module whose input statistics it uses
LINEARS = {
    "self_attn.q_proj": "self_attn.q_proj", "self_attn.k_proj": "self_attn.q_proj",
    "self_attn.v_proj": "self_attn.q_proj", "self_attn.o_proj": "self_attn.o_proj",
    "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.gate_proj", "mlp.down_proj": "mlp.down_proj",
}


@dataclass
class Stats:
    """Accumulated input statistics of one linear group."""
    hessian: "object"   # torch float32 [in, in], sum of x x^T
    tokens: int = 0

    def add(self, x) -> None:
        """Accumulate x^T x for a batch of inputs x [tokens, in] (f32 products)."""
        if x.device.type == "cpu":
            # NumPy recognises a.T @ a and calls BLAS syrk: half the FLOPs of torch's general matmul
            xn = x.float().numpy()
            self.hessian += xn.T @ xn
        else:
            self.hessian.addmm_(x.float().T, x.float())
        self.tokens += x.shape[0]

    def mean_hessian(self) -> np.ndarray:
        h = self.hessian if isinstance(self.hessian, np.ndarray) else self.hessian.cpu().numpy()
        return (h / max(1, self.tokens)).astype(np.float32)


class LayerwiseEngine:
    """Produces the quantized linears of each layer in order (call :meth:`layer` with 0, 1, 2, ...)."""

    def __init__(self, cfg: ModelConfig, source: CheckpointSource, tokens: np.ndarray,
                 types: dict[str, T], method: Method, *, device: str = "cpu", batch: int = 8,
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
        self.torch.save(self.hidden.cpu(), self.work / ".hidden.pt")
        os.replace(self.work / ".hidden.pt", self.work / "hidden.pt")
        (self.work / ".state.json").write_text(json.dumps({"layer": i}))
        os.replace(self.work / ".state.json", self.work / "state.json")

    def _load_layer(self, i: int) -> dict[str, QuantizedTensor]:
        out = {}
        with np.load(self.work / f"layer-{i:03d}.npz") as z:
            for key in z.files:
                name, typ, r, c = key.split("|")
                out[name] = QuantizedTensor(name, T[typ], (int(r), int(c)), z[key])
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
        out: dict[str, QuantizedTensor] = {}
        for lin, stat_of in LINEARS.items():
            name = f"{prefix}{lin}.weight"
            w = self.source.full(name)  # full precision, not the bf16 copy inside the module
            out[name] = self.method.quantize(name, w, self.types[name], CalibStats(stats[stat_of].mean_hessian()))
        with torch.no_grad():
            for lin in LINEARS:
                deq = out[f"{prefix}{lin}.weight"].dequantize()
                module.get_submodule(lin).weight.copy_(torch.from_numpy(deq).to(self.device))
        self.hidden = self._run(module)
        self.done = i
        self._save(i, out)
        self.progress(i)
        return out

    def _run(self, module):
        """The layer over all calibration activations, batch by batch, in the engine dtype; f32 out."""
        outs = [self.dec.run_layer(module, self.hidden[b:b + self.batch].to(self.dtype)).float()
                for b in range(0, self.hidden.shape[0], self.batch)]
        return self.torch.cat(outs)

    def _collect(self, module) -> dict[str, Stats]:
        torch = self.torch
        stats: dict[str, Stats] = {}
        hooks = []
        for name in set(LINEARS.values()):
            lin = module.get_submodule(name)
            n = lin.in_features
            stats[name] = Stats(np.zeros((n, n), np.float32) if self.device == "cpu"
                                else torch.zeros(n, n, device=self.device))

            def hook(_mod, inputs, name=name):
                # f32 products: bf16 partial sums break positive-definiteness of the near-singular
                # Hessians (o_proj's input under GQA has eigenvalues far below bf16's resolution)
                stats[name].add(inputs[0].reshape(-1, inputs[0].shape[-1]))
            hooks.append(lin.register_forward_pre_hook(hook))
        try:
            self._run(module)
        finally:
            for h in hooks:
                h.remove()
        return stats


def fingerprint(*parts: object) -> str:
    """A short hash of everything a resumed run must share with the interrupted one."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else repr(p).encode())
    return h.hexdigest()[:16]
