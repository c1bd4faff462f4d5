"""The code's shape, checked on its source: the import layers, and the model package's monopoly on tensor names.

Layers (``../shared/DESIGN.md``): app -> exporters | calibration -> quantizers -> model. The app is every
``qcompile`` module outside ``qcompile.model`` and the shared utilities below. ``python tests/test_layering.py``
prints the counts the reshape is judged by.
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("qcompile", "quantizers", "calibration", "exporters")
# below every layer: errors, the file-mapping helper, the llama.cpp child-process wrapper, report.json's types
UTILITIES = {"qcompile.errors", "qcompile.spill", "qcompile.memwatch", "qcompile.llama_worker",
             "qcompile.report_types"}
# layer -> the first-party layers it must not import
FORBIDDEN = {
    "model": {"quantizers", "calibration", "exporters", "app"},
    "quantizers": {"calibration", "exporters", "app"},
    "calibration": {"app"},
    "exporters": {"app"},
}
# a Hugging Face tensor or module name of the Qwen layouts, as a string literal would spell it
HF_NAME = re.compile(r"model\.layers|embed_tokens|lm_head\.|model\.norm|self_attn\.|mlp\.|_layernorm|"
                     r"\b(q|k|v|o|gate|up|down)_proj\b")
FORMATS = {"gguf", "onnx", "openvino"}


def layer_of(module: str) -> str | None:
    """The layer of a first-party module name; None for third-party ones and the shared utilities."""
    top = module.split(".")[0]
    if top not in PACKAGES or module in UTILITIES:
        return None
    if top == "qcompile":
        return "model" if module == "qcompile.model" or module.startswith("qcompile.model.") else "app"
    return top


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of import nodes inside ``if TYPE_CHECKING:`` blocks (annotations only: no run-time dependency)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return out


def imports(source: str) -> list[tuple[int, str]]:
    """(line, module) of every run-time import in ``source``, function-local ones included; ``from pkg import
    mod`` counts as ``pkg.mod``."""
    tree = ast.parse(source)
    skip = _type_checking_only(tree)
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def violations(module: str, source: str) -> list[str]:
    """Imports of ``module`` (its source given) that cross the layers the wrong way."""
    mine = layer_of(module)
    if mine is None:
        return []
    bad = []
    for line, target in imports(source):
        # ``from pkg import name``: the module is pkg.name if that is a module, else pkg
        theirs = layer_of(target) if _is_module(target) else layer_of(target.rsplit(".", 1)[0])
        if theirs in FORBIDDEN.get(mine, set()) and theirs != mine:
            bad.append(f"{module}:{line}: {mine} imports {target} ({theirs})")
    return bad


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def product_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def tensor_name_literals(source: str) -> list[tuple[int, str]]:
    """String constants (docstrings aside; f-string parts included) that spell an HF tensor or module name."""
    tree = ast.parse(source)
    docs = _docstrings(tree)
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs
            and HF_NAME.search(n.value)]


def format_comparisons(source: str) -> list[tuple[int, str]]:
    """Comparisons against an output format's name (``== "onnx"``, ``in ("onnx", "openvino")``)."""
    def named(node: ast.AST) -> bool:
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(named(e) for e in node.elts)
        return isinstance(node, ast.Constant) and node.value in FORMATS

    return [(n.lineno, ast.unparse(n)) for n in ast.walk(ast.parse(source))
            if isinstance(n, ast.Compare) and any(named(x) for x in [n.left, *n.comparators])]


def counts() -> dict[str, list[str]]:
    """The reshape's measures over the product packages."""
    out: dict[str, list[str]] = {"layer violations": [], "HF tensor-name literals outside qcompile/model": [],
                                 "output-format comparisons outside exporters/": [],
                                 "method-name branches in the layer engine": []}
    for path in product_files():
        src, mod = path.read_text(encoding="utf-8"), module_name(path)
        rel = path.relative_to(ROOT)
        out["layer violations"] += violations(mod, src)
        if layer_of(mod) != "model":
            out["HF tensor-name literals outside qcompile/model"] += [f"{rel}:{n}: {v!r}"
                                                                       for n, v in tensor_name_literals(src)]
        if layer_of(mod) != "exporters":
            out["output-format comparisons outside exporters/"] += [f"{rel}:{n}: {c}"
                                                                     for n, c in format_comparisons(src)]
    engine = (ROOT / "calibration" / "capture.py").read_text(encoding="utf-8")
    out["method-name branches in the layer engine"] = [
        f"calibration/capture.py:{n.lineno}: {ast.unparse(n.test)}" for n in ast.walk(ast.parse(engine))
        if isinstance(n, (ast.If, ast.IfExp)) and re.search(r"method\.(name|awq)\b|\"(gptq|awq|rtn|imatrix)",
                                                            ast.unparse(n.test))]
    return out


# ---- the checks ----------------------------------------------------------------------------------------------

def test_no_layer_imports_upwards():
    assert counts()["layer violations"] == []


def test_the_checker_sees_a_forbidden_import():
    """A checker that cannot fail is no check: forbidden imports, also function-local ones, are found; imports
    for annotations only (``if TYPE_CHECKING:``) and downward ones are not."""
    assert violations("quantizers.rtn", "from exporters import gguf\n")
    assert violations("quantizers.rtn", "def f():\n    from qcompile.pipeline import compile_model\n")
    assert violations("calibration.capture", "from qcompile import pipeline\n")
    assert violations("exporters.onnx", "import qcompile.cli\n")
    assert violations("qcompile.model.decoder", "from quantizers.tensor import QuantizedTensor\n")
    assert not violations("qcompile.model.decoder",
                          "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from quantizers import x\n")
    assert not violations("calibration.capture", "from qcompile.model import ModelConfig\nfrom quantizers import rtn\n")
    assert not violations("exporters.gguf", "from qcompile.errors import QCompileError\n")


def test_only_the_model_package_spells_tensor_names():
    assert counts()["HF tensor-name literals outside qcompile/model"] == []
    assert tensor_name_literals('x = f"model.layers.{i}.mlp.down_proj.weight"\n')  # the check can fail
    assert not tensor_name_literals('def f():\n    """reads ``lm_head.weight``"""\n')


def test_only_exporters_compare_output_format_names():
    assert counts()["output-format comparisons outside exporters/"] == []
    assert format_comparisons('if opts.to in ("onnx", "openvino"):\n    pass\n')  # the check can fail
    assert not format_comparisons('x = d.get("gguf") == "hardlink"\n')


def test_the_layer_engine_does_not_branch_on_methods():
    assert counts()["method-name branches in the layer engine"] == []


if __name__ == "__main__":
    for what, items in counts().items():
        print(f"{what}: {len(items)}")
        for item in items:
            print(f"    {item}")
    sys.exit(0)
