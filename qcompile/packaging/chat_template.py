"""The source model's Jinja chat template: loading, rendering, and measuring the pieces an Ollama
template needs (``probe``).

Rendering goes through transformers' own ``render_jinja_template`` (what ``apply_chat_template`` uses),
so the reference is exactly what transformers users get.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qcompile.errors import QCompileError
from qcompile.packaging import templates as T

# probe values: distinctive strings that cannot occur in a template's own text
_SYS = "qcompile-probe-system-7f3a"
_USER = "qcompile-probe-user-5c1e"
PROBE_TOOLS = [
    {"type": "function", "function": {"name": "probe_one", "description": "first probe tool",
                                      "parameters": {"type": "object", "properties": {"a": {"type": "string"}},
                                                     "required": ["a"]}}},
    {"type": "function", "function": {"name": "probe_two", "description": "second probe tool",
                                      "parameters": {"type": "object", "properties": {}}}},
]


def tojson(v) -> str:
    """Jinja's ``tojson`` filter as transformers defines it."""
    return json.dumps(v, ensure_ascii=False)


@dataclass(frozen=True)
class ChatTemplate:
    """The Jinja source plus the special-token strings transformers passes to it."""
    source: str
    special_tokens: dict[str, str]

    def render(self, messages: list[dict], tools: list[dict] | None = None, *,
               add_generation_prompt: bool = False, continue_final_message: bool = False) -> str:
        from transformers.utils.chat_template_utils import render_jinja_template
        try:
            out, _ = render_jinja_template([messages], tools=tools, chat_template=self.source,
                                           add_generation_prompt=add_generation_prompt,
                                           continue_final_message=continue_final_message, **self.special_tokens)
        except Exception as e:  # jinja2 raises its own exception types (and TemplateError from raise_exception)
            raise QCompileError(f"the model's chat template failed to render: {e}") from None
        return out[0]


def load(model_dir: Path) -> ChatTemplate | None:
    """The chat template of a checkpoint (``chat_template.jinja`` first, as transformers reads it, then
    ``tokenizer_config.json``), or None when it has none."""
    cfg_path = model_dir / "tokenizer_config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    except (OSError, ValueError) as e:
        raise QCompileError(f"{cfg_path}: unreadable ({e})") from None
    jinja = model_dir / "chat_template.jinja"
    src = jinja.read_text(encoding="utf-8") if jinja.is_file() else cfg.get("chat_template")
    if isinstance(src, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in src if isinstance(t, dict)}
        src = named.get("default") or next(iter(named.values()), None)
    if not src:
        return None
    special = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        v = cfg.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        if isinstance(v, str):
            special[key] = v
    return ChatTemplate(src, special)


@dataclass(frozen=True)
class ChatSpec:
    """The model-specific literal pieces of a Qwen ChatML template, measured by rendering it."""
    default_system: str | None
    sys_open: str              # text before a system message's content
    sys_close: str             # text after it (closing the system turn)
    gen: str                   # the generation prompt
    tools: dict | None         # tools_with_system, tools_without_system, tool_sep, tools_outro, tool_json


def _cut(text: str, prefix: str, what: str) -> str:
    if not text.startswith(prefix):
        raise QCompileError(f"the chat template is not Qwen ChatML: {what} renders as {text[:80]!r}")
    return text[len(prefix):]


def probe(tpl: ChatTemplate) -> ChatSpec:
    """Measure the system block, default system prompt, generation prompt and tool block of ``tpl``;
    raise a QCompileError when it does not have Qwen's ChatML shape."""
    user = [{"role": "user", "content": _USER}]
    system = [{"role": "system", "content": _SYS}]
    turn = T.CHATML["turn_open"] + "user" + T.CHATML["turn_role_end"] + _USER + T.CHATML["turn_close"]
    # system block: "<sys_open>S<sys_close>" before the user turn
    with_sys = tpl.render(system + user)
    if not with_sys.endswith(turn) or _SYS not in with_sys:
        raise QCompileError(f"the chat template is not Qwen ChatML: a system + user conversation renders as "
                            f"{with_sys[:120]!r}")
    sys_open, _, sys_close = with_sys[:-len(turn)].partition(_SYS)
    # the default system prompt: the system block the template writes when no system message is given
    bare = tpl.render(user)
    if not bare.endswith(turn):
        raise QCompileError(f"the chat template is not Qwen ChatML: a user message renders as {bare[:120]!r}")
    block = bare[:-len(turn)]
    default = None
    if block:
        inner = _cut(block, sys_open, "the default system block")
        if not inner.endswith(sys_close):
            raise QCompileError(f"unexpected default system block {block!r}")
        default = inner[:len(inner) - len(sys_close)]
    gen = tpl.render(user, add_generation_prompt=True)[len(bare):]
    return ChatSpec(default, sys_open, sys_close, gen, _probe_tools(tpl, user, system, turn, sys_open))


def _probe_tools(tpl: ChatTemplate, user: list, system: list, turn: str, sys_open: str) -> dict | None:
    """The tool block: text around and between the tools' JSON, with and without a system message; None
    when the template ignores tools."""
    plain = tpl.render(user)
    out = tpl.render(user, PROBE_TOOLS)
    if out == plain:
        return None
    for kind, objs in (("tool", PROBE_TOOLS), ("function", [t["function"] for t in PROBE_TOOLS])):
        j1, j2 = (tojson(o) for o in objs)
        if j1 in out and j2 in out:
            break
    else:
        raise QCompileError("the chat template renders tools in a shape qcompile cannot express for Ollama "
                            "(neither `tool | tojson` nor `tool.function | tojson`)")
    if not out.endswith(turn):
        raise QCompileError(f"the chat template puts tools after the conversation: {out[-120:]!r}")
    header = out[:-len(turn)]
    without, _, rest = header.partition(j1)
    sep, _, outro = rest.partition(j2)
    with_header = tpl.render(system + user, PROBE_TOOLS)[:-len(turn)]
    pre = sys_open + _SYS
    if not with_header.startswith(pre) or not with_header.endswith(j2 + outro):
        raise QCompileError(f"the chat template's tool block with a system message is not understood: "
                            f"{with_header[:160]!r}")
    with_system = with_header[len(pre):].partition(j1)[0]
    return {"tools_with_system": with_system, "tools_without_system": without, "tool_sep": sep,
            "tools_outro": outro, "tool_json": kind}
