"""A real-weight mixture-of-experts Qwen for quality numbers, upcycled from the real dense 0.5B.

No real MoE checkpoint is reachable here, so this builds one honestly from real weights — it is NOT a Qwen
release and its perplexities are its own. Source: ../shared/tools/real_qwen.py's Qwen2.5-Coder-0.5B-Instruct
(itself a dequantized Q4_K_M release with function-preserving channel rescaling). Result: a ``qwen2_moe``
checkpoint (the family that keeps Qwen2.5's q/k/v biases) where each layer's dense MLP (width 4864 = 19 x 256)
is cut into column slices of its gate/up rows and down columns:

* the shared expert: the first ``--shared`` columns (default 1024), behind a sigmoid gate of tiny weights
  (sigmoid(~0) = 1/2, so its down_proj is doubled; not exactly zero: llama.cpp computes that sigmoid as
  silu(x) / x, NaN at 0);
* the routed experts: the rest in ``--experts`` slices of equal width (default 15 x 256), top-``--top-k``
  (default 12) chosen per token. Each routed expert's down_proj is multiplied by the expert count: with a
  router of near-equal logits every softmax weight is about 1/E, so the layer computes (to the router's
  small spread) the sum of the chosen slices, and with top-k = E the dense MLP itself.
* the router: real selectivity, fitted on data. For every layer, the MLP inputs of ``--fit-tokens`` tokens
  of brown.txt (its first third, the text calibration also draws from; the held-out sets are elsewhere) and
  each slice's output norm on them; the router is the ridge regression of the (standardised) slice norms on
  the inputs, scaled so its logits have a standard deviation of ``--spread`` (0.05): it ranks the slices
  that matter most for the token first, and its softmax weights stay within a few percent of 1/E.

The model loses the slices its router leaves out (a fifth of the routed width per token at 12 of 15: PPL 9.5
on python-docs vs the dense model's 6.5, and 6.5 again with all 15 experts active); the
quality benchmark measures every quantization against this MoE's own bf16 logits, not the dense model's.

    python benchmarks/upcycle.py [--out DIR] [--experts 15] [--top-k 10] [--shared 1024]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tools import SHARED  # noqa: E402
from kld_bench import REAL, real_model  # noqa: E402

DEFAULT_OUT = Path.home() / ".cache" / "qcompile-bench" / "moe" / "Qwen2.5-Coder-0.5B-upcycled-MoE"


def mlp_inputs(model_dir: Path, tokens: np.ndarray) -> list[np.ndarray]:
    """Each layer's MLP input (after post_attention_layernorm) for ``tokens`` [n, T], from the dense model."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    got: list[list[np.ndarray]] = [[] for _ in model.model.layers]
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: got[i].append(a[0].reshape(-1, a[0].shape[-1])
                                                                                   .numpy().copy()))
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        for row in tokens:
            model(torch.from_numpy(row[None]))
    for h in hooks:
        h.remove()
    return [np.concatenate(g) for g in got]


def fit_router(x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray, cuts: list[tuple[int, int]],
               spread: float, ridge: float = 1e-2) -> np.ndarray:
    """[E, hidden] router: ridge regression of each slice's standardised output norm on the inputs ``x``."""
    g, u = x @ gate.T, x @ up.T
    act = g / (1 + np.exp(-g)) * u                          # SiLU(gate) * up, [tokens, width]
    norms = np.stack([np.linalg.norm(act[:, a:b] @ down[:, a:b].T, axis=1) for a, b in cuts], axis=1)
    target = (norms - norms.mean(0)) / (norms.std(0) + 1e-6)
    xtx = x.T @ x
    w = np.linalg.solve(xtx + ridge * np.trace(xtx) / len(xtx) * np.eye(len(xtx)), x.T @ target).T  # [E, hidden]
    logits = x @ w.T
    return (w * (spread / (logits.std() + 1e-9))).astype(np.float32)


def build(src: Path, out: Path, experts: int, top_k: int, shared: int, fit_tokens: int, spread: float,
          seed: int = 0) -> Path:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer
    cfg = json.loads((src / "config.json").read_text())
    inter, hidden = cfg["intermediate_size"], cfg["hidden_size"]
    width = (inter - shared) // experts
    if width * experts + shared != inter or width % 256:
        raise SystemExit(f"{inter} - {shared} is not {experts} experts of a multiple of 256")
    cuts = [(shared + e * width, shared + (e + 1) * width) for e in range(experts)]
    spec = dict(experts=experts, top_k=top_k, shared=shared, fit_tokens=fit_tokens, spread=spread, seed=seed,
                shared_gate="1e-4 normal")
    if (out / "upcycle.json").is_file() and json.loads((out / "upcycle.json").read_text()) == spec:
        return out
    tok = AutoTokenizer.from_pretrained(src)
    text = (SHARED / "corpora" / "brown.txt").read_text(encoding="utf-8", errors="replace")
    ids = np.array(tok(text[: len(text) // 3])["input_ids"])
    rng = np.random.default_rng(seed)
    seqlen = 512
    starts = rng.choice(len(ids) - seqlen, fit_tokens // seqlen, replace=False)
    x_layers = mlp_inputs(src, np.stack([ids[s:s + seqlen] for s in starts]))
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    index: dict[str, str] = {}
    for shard in sorted(src.glob("*.safetensors")):
        state = load_file(shard)
        new: dict[str, torch.Tensor] = {}
        for name, t in state.items():
            if ".mlp." not in name:
                new[name] = t
                continue
            pre, _, rel = name.partition(".mlp.")
            if rel != "gate_proj.weight":
                continue  # up/down handled with gate (a layer's MLP lives in one shard)
            i = int(pre.rsplit(".", 1)[1])
            gate, up, down = (state[f"{pre}.mlp.{r}.weight"].float() for r in ("gate_proj", "up_proj", "down_proj"))
            router = fit_router(x_layers[i], gate.numpy(), up.numpy(), down.numpy(), cuts, spread)
            bf = lambda a: a.contiguous().to(torch.bfloat16)
            new[f"{pre}.mlp.gate.weight"] = bf(torch.from_numpy(router))
            new[f"{pre}.mlp.shared_expert.gate_proj.weight"] = bf(gate[:shared])
            new[f"{pre}.mlp.shared_expert.up_proj.weight"] = bf(up[:shared])
            new[f"{pre}.mlp.shared_expert.down_proj.weight"] = bf(2 * down[:, :shared])
            # sigmoid(~0) = 1/2. Not exactly zero: llama.cpp's qwen2moe graph computes the sigmoid as silu(x) / x,
            # which is 0/0 = NaN for a gate of zero weights
            new[f"{pre}.mlp.shared_expert_gate.weight"] = bf(torch.from_numpy(
                rng.standard_normal((1, hidden)).astype(np.float32) * 1e-4))
            for e, (a, b) in enumerate(cuts):
                new[f"{pre}.mlp.experts.{e}.gate_proj.weight"] = bf(gate[a:b])
                new[f"{pre}.mlp.experts.{e}.up_proj.weight"] = bf(up[a:b])
                new[f"{pre}.mlp.experts.{e}.down_proj.weight"] = bf(experts * down[:, a:b])
        save_file(new, str(tmp / shard.name), metadata={"format": "pt"})
        index |= {n: shard.name for n in new}
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    moe = {**cfg, "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "num_experts": experts,
           "num_experts_per_tok": top_k, "moe_intermediate_size": width, "shared_expert_intermediate_size": shared,
           "norm_topk_prob": False, "decoder_sparse_step": 1, "mlp_only_layers": [], "output_router_logits": False,
           "router_aux_loss_coef": 0.0, "qkv_bias": True}
    (tmp / "config.json").write_text(json.dumps(moe, indent=1))
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, tmp / f.name)
    (tmp / "upcycle.json").write_text(json.dumps(spec))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=REAL)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--experts", type=int, default=15)
    ap.add_argument("--top-k", type=int, default=12)
    ap.add_argument("--shared", type=int, default=1024)
    ap.add_argument("--fit-tokens", type=int, default=8192)
    ap.add_argument("--spread", type=float, default=0.05)
    a = ap.parse_args(argv)
    print(build(real_model(a.src), a.out, a.experts, a.top_k, a.shared, a.fit_tokens, a.spread), file=sys.stderr)


if __name__ == "__main__":
    main()
