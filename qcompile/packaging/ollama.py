"""Ollama: the ``Modelfile`` (template, stop tokens, system prompt, sampling defaults), the check that its
template renders what the model's Jinja template renders, and ``ollama create``."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from qcompile.errors import QCompileError
from qcompile.packaging import templates as T
from qcompile.packaging.chat_template import ChatSpec, ChatTemplate, tojson
from qcompile.packaging.gojson import go_json
from qcompile.packaging.ollama_api import Tool, ToolCallFunction, render_chat


def _fill(skeleton: str, slots: dict[str, str]) -> str:
    return re.sub(r"<<(\w+)>>", lambda m: slots[m.group(1)], skeleton)


def _literal(text: str) -> str:
    """Model text as Go template text: only ``{{`` would be read as an action."""
    return text.replace("{{", '{{ "{{" }}')


def build_template(spec: ChatSpec) -> str:
    """The Ollama (Go) template for a model whose Jinja template measured as ``spec``."""
    lit = {k: _literal(v) for k, v in T.CHATML.items()}
    lit.update(sys_open=_literal(spec.sys_open), sys_close=_literal(spec.sys_close), gen=_literal(spec.gen),
               default_block=_literal(spec.sys_open + spec.default_system + spec.sys_close)
               if spec.default_system is not None else "")
    if spec.tools:
        block = _fill(T.SYSTEM_BLOCK_TOOLS, {**lit, **{k: _literal(v) for k, v in spec.tools.items()
                                                       if k != "tool_json"},
                                             "tool_json": T.TOOL_JSON[spec.tools["tool_json"]]})
    else:
        block = _fill(T.SYSTEM_BLOCK_PLAIN, lit)
    return _fill(T.OLLAMA_TEMPLATE, {**lit, "system_block": block,
                                     "tools_note": " with tools" if spec.tools else ""})


# ---- equivalence with the Jinja template --------------------------------------------------------------

def jinja_as_ollama(text: str, messages: list[dict], tools: list[dict] | None, spec: ChatSpec) -> str:
    """The Jinja rendering with each JSON value re-serialized the way Ollama must write it.

    Ollama decodes tools and tool-call arguments into Go structs and re-encodes them with Go's JSON
    encoder (no spaces, HTML-safe escapes, its own key order for tool schemas); a Go template has no way to
    reproduce Python's ``json.dumps`` spacing. That is the one difference allowed; every other byte must
    be equal."""
    for t in tools or []:
        go_tool = Tool(t)
        if spec.tools and spec.tools["tool_json"] == "function":
            text = text.replace(tojson(t["function"]), go_json(go_tool.Function))
        else:
            text = text.replace(tojson(t), f'{{"type": {go_json(go_tool.Type)}, "function": '
                                           f'{go_json(go_tool.Function)}}}')
    for m in messages:
        for tc in m.get("tool_calls") or []:
            fn = tc.get("function", tc)
            text = text.replace(tojson(fn.get("arguments")), go_json(ToolCallFunction(fn).Arguments))
    return text


# conversations the template is checked on (the final one ends on an assistant message: continued)
_WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}
_TIME = {"type": "function", "function": {"name": "get_time", "description": "Local time",
                                          "parameters": {"type": "object", "properties": {}}}}
CHECK_CONVERSATIONS: list[tuple[list[dict], list[dict] | None]] = [
    ([{"role": "user", "content": "Hello!"}], None),
    ([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}], None),
    ([{"role": "user", "content": "Weather in Paris?"}], [_WEATHER, _TIME]),
    ([{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather in Paris and time?"},
      {"role": "assistant", "content": "Checking.", "tool_calls": [
          {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}},
          {"type": "function", "function": {"name": "get_time", "arguments": {}}}]},
      {"role": "tool", "content": '{"temp": 21}'}, {"role": "tool", "content": "12:00"},
      {"role": "assistant", "content": "21 C at noon."}, {"role": "user", "content": "Thanks"}], [_WEATHER, _TIME]),
    ([{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi"}], None),
]


@dataclass
class CheckResult:
    conversations: int = 0
    mismatches: list[str] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return not self.mismatches


def check_template(template: str, jinja: ChatTemplate, spec: ChatSpec, system: str | None) -> CheckResult:
    """Render ``template`` as Ollama would (with ``SYSTEM`` = ``system``) and the Jinja template as
    transformers would, on ``CHECK_CONVERSATIONS``; collect a description of each difference."""
    res = CheckResult()
    for messages, tools in CHECK_CONVERSATIONS:
        if tools and not spec.tools:
            continue
        cont = messages[-1]["role"] == "assistant"
        want = jinja_as_ollama(jinja.render(messages, tools, add_generation_prompt=not cont,
                                            continue_final_message=cont), messages, tools, spec)
        for sys in {system, None}:
            got = render_chat(template, messages, tools, sys)
            res.conversations += 1
            if got != want:
                at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                roles = "+".join(m["role"] for m in messages) + (" with tools" if tools else "")
                res.mismatches.append(f"{roles}: differs at character {at}: Ollama {got[at:at + 40]!r}, "
                                      f"Jinja {want[at:at + 40]!r}")
    return res


# ---- the Modelfile -------------------------------------------------------------------------------------

def _go_printable(ch: str) -> bool:
    # Ollama's Modelfile parser keeps only strconv.IsPrint runes (plus tabs and newlines) in a value
    return ch in "\t\n" or ch == " " or unicodedata.category(ch)[0] not in "CZ"


def quote_value(text: str, what: str) -> str:
    """A Modelfile value that Ollama's parser reads back as exactly ``text``."""
    if '"""' in text:
        raise QCompileError(f'{what} contains """, which a Modelfile cannot quote')
    bad = sorted({c for c in text if not _go_printable(c)})
    if bad:
        raise QCompileError(f"{what} contains characters Ollama's Modelfile parser drops: "
                            f"{', '.join(repr(c) for c in bad)}")
    return f'"""{text}"""'


def stop_tokens(model_dir: Path, chatml: bool) -> list[str]:
    """Stop sequences: ChatML turn markers, every end-of-sequence token the checkpoint names
    (tokenizer_config ``eos_token``, generation_config ``eos_token_id``), and ``<|endoftext|>``."""
    added = _added_tokens(model_dir)
    stops: list[str] = list(T.CHATML_STOPS) if chatml else []
    cfg = _json(model_dir / "tokenizer_config.json")
    eos = cfg.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if isinstance(eos, str):
        stops.append(eos)
    ids = _json(model_dir / "generation_config.json").get("eos_token_id")
    by_id = {i: t for t, i in added.items()}
    for i in ids if isinstance(ids, list) else [ids] if isinstance(ids, int) else []:
        if i in by_id:
            stops.append(by_id[i])
    if T.DOCUMENT_END in added:
        stops.append(T.DOCUMENT_END)
    return list(dict.fromkeys(stops))


def sampling_parameters(model_dir: Path) -> dict[str, int | float]:
    """Ollama PARAMETERs from generation_config.json (only what the checkpoint sets)."""
    gen = _json(model_dir / "generation_config.json")
    if gen.get("do_sample") is False:
        # transformers decodes greedily then, whatever temperature says; Ollama's equivalent is temperature 0
        return {"temperature": 0}
    out: dict[str, int | float] = {}
    for key, (name, typ) in T.GENERATION_PARAMETERS.items():
        v = gen.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[name] = typ(v)
    return out


def _json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError) as e:
        raise QCompileError(f"{path}: unreadable ({e})") from None
    return d if isinstance(d, dict) else {}


def _added_tokens(model_dir: Path) -> dict[str, int]:
    tj = _json(model_dir / "tokenizer.json")
    return {t["content"]: t["id"] for t in tj.get("added_tokens", []) if "content" in t and "id" in t}


def ollama_name(name: str, scheme: str) -> str:
    """``model:tag`` within Ollama's name rules (letters, digits, ``_ . -``; lower case by convention)."""
    def clean(s: str) -> str:
        return re.sub(r"[^a-z0-9_.-]+", "-", s.lower()).strip("-.")[:80] or "model"
    return f"{clean(name)}:{clean(scheme)}"


@dataclass
class Modelfile:
    """What the Modelfile says, and its text."""
    gguf: str
    template: str | None
    system: str | None
    stops: list[str]
    parameters: dict[str, int | float]
    header: str = ""
    projector: str | None = None   # an mmproj GGUF beside the model: a second FROM, Ollama's projector layer

    def text(self) -> str:
        lines = [self.header.rstrip("\n"), "", f"FROM ./{self.gguf}"]
        if self.projector is not None:
            lines.append(f"FROM ./{self.projector}")
        if self.template is not None:
            lines.append(f"TEMPLATE {quote_value(self.template, 'the chat template')}")
        if self.system is not None:
            lines.append(f"SYSTEM {quote_value(self.system, 'the default system prompt')}")
        for s in self.stops:
            if '"' in s or any(not _go_printable(c) or c in "\t\n" for c in s):
                raise QCompileError(f"stop token {s!r} cannot be written as a Modelfile value")
            lines.append(f'PARAMETER stop "{s}"')
        for k, v in self.parameters.items():
            lines.append(f"PARAMETER {k} {v!r}" if isinstance(v, float) else f"PARAMETER {k} {v}")
        return "\n".join(lines) + "\n"


# ---- ollama create -------------------------------------------------------------------------------------

def create(name: str, modelfile: Path) -> dict:
    """Run ``ollama create NAME -f Modelfile`` when an ``ollama`` binary is on PATH. Returns the record
    for report.json (``ran: false`` without one); never raises for Ollama's own failure."""
    exe = shutil.which("ollama")
    if exe is None:
        return {"ran": False, "reason": "no ollama binary on PATH"}
    cmd = [exe, "create", name, "-f", str(modelfile)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, errors="replace", stdin=subprocess.DEVNULL,
                           check=False)
    except OSError as e:
        return {"ran": True, "ok": False, "command": cmd, "returncode": None, "message": str(e)}
    lines = [ln.strip() for ln in (p.stderr + "\n" + p.stdout).splitlines() if ln.strip()]
    msg = lines[-1] if lines else ""
    return {"ran": True, "ok": p.returncode == 0, "command": cmd, "returncode": p.returncode, "message": msg}
