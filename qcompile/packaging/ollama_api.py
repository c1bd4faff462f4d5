"""What Ollama hands a chat template, emulated: its API types and the steps before ``Execute``.

Used to render our Modelfile ``TEMPLATE`` exactly as an Ollama server would, so it can be compared with
the model's Jinja template. Mirrors (Ollama's ``api/types.go``, ``server/routes.go``, ``template/template.go``):

* request JSON decoded into Go structs: unknown tool-schema keys are dropped, struct fields re-encode in
  declaration order, tool-call arguments and tool properties keep their insertion order (Ollama's
  ordered maps) while nested objects are plain Go maps (sorted keys), numbers become float64;
* the chat handler prepends the Modelfile's ``SYSTEM`` as a system message when the first message is not
  one;
* ``collate``: consecutive messages of the same role (except ``tool``) are merged with a blank line, and
  ``.System`` is every system message joined by a blank line;
* the template runs with ``System``, ``Messages``, ``Tools``, ``Response`` (empty) and the thinking flags.
"""
from __future__ import annotations

from typing import Any

from qcompile.packaging.gojson import GoStruct, OrderedMap, go_json


def go_any(v: Any) -> Any:
    """A JSON value decoded into Go's ``any``: objects become maps, numbers float64."""
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, (list, tuple)):
        return [go_any(x) for x in v]
    if isinstance(v, dict):
        return {str(k): go_any(x) for k, x in v.items()}
    raise TypeError(f"not a JSON value: {type(v).__name__}")


def _ordered(d: dict | None, convert) -> OrderedMap | None:
    if d is None:
        return None
    if not isinstance(d, dict):
        raise TypeError(f"expected a JSON object, got {type(d).__name__}")
    return OrderedMap((str(k), convert(v)) for k, v in d.items())


class _Stringer(GoStruct):
    """Ollama gives these types a ``String()`` that is their JSON."""

    def go_string(self) -> str:
        return go_json(self)


class ToolProperty(_Stringer):
    FIELDS = (("anyOf", "AnyOf", "value"), ("type", "Type", "value"), ("items", "Items", "nil"),
              ("description", "Description", "value"), ("enum", "Enum", "value"),
              ("properties", "Properties", "nil"))

    def __init__(self, d: dict):
        self.AnyOf = [ToolProperty(x) for x in d.get("anyOf") or []]
        t = d.get("type")
        # PropertyType: a string or a list of strings; one type re-encodes as a plain string
        self.Type = [] if t is None else [t] if isinstance(t, str) else list(t)
        self.Items = go_any(d["items"]) if "items" in d else None
        self.Description = d.get("description") or ""
        self.Enum = [go_any(x) for x in d.get("enum") or []]
        self.Properties = _ordered(d.get("properties"), ToolProperty)

    def go_json_fields(self):
        return [(k, (v[0] if k == "type" and len(v) == 1 else v)) for k, v in super().go_json_fields()]


class ToolFunctionParameters(_Stringer):
    FIELDS = (("type", "Type", False), ("$defs", "Defs", "nil"), ("items", "Items", "nil"),
              ("required", "Required", "value"), ("properties", "Properties", False))

    def __init__(self, d: dict):
        self.Type = d.get("type") or ""
        self.Defs = go_any(d["$defs"]) if "$defs" in d else None
        self.Items = go_any(d["items"]) if "items" in d else None
        self.Required = list(d.get("required") or [])
        self.Properties = _ordered(d.get("properties"), ToolProperty)   # nil pointer -> null


class ToolFunction(_Stringer):
    FIELDS = (("name", "Name", False), ("description", "Description", "value"),
              ("parameters", "Parameters", False))

    def __init__(self, d: dict):
        self.Name = d.get("name") or ""
        self.Description = d.get("description") or ""
        self.Parameters = ToolFunctionParameters(d.get("parameters") or {})


class Tool(_Stringer):
    FIELDS = (("type", "Type", False), ("items", "Items", "nil"), ("function", "Function", False))

    def __init__(self, d: dict):
        self.Type = d.get("type") or ""
        self.Items = go_any(d["items"]) if "items" in d else None
        self.Function = ToolFunction(d.get("function") or {})


class ToolCallArguments(OrderedMap):
    """``ToolCallFunctionArguments``: insertion-ordered; its ``String()`` is its JSON."""

    def go_string(self) -> str:
        return go_json(self)


class ToolCallFunction(GoStruct):
    FIELDS = (("index", "Index", False), ("name", "Name", False), ("arguments", "Arguments", False))

    def __init__(self, d: dict):
        self.Index = int(d.get("index") or 0)
        self.Name = d.get("name") or ""
        args = d.get("arguments")
        if args is not None and not isinstance(args, dict):
            # Ollama's API takes arguments as a JSON object; a JSON-encoded string does not decode
            raise TypeError("tool call arguments must be a JSON object")
        self.Arguments = ToolCallArguments(_ordered(args or {}, go_any))


class ToolCall(GoStruct):
    FIELDS = (("id", "ID", "value"), ("function", "Function", False))

    def __init__(self, d: dict):
        self.ID = d.get("id") or ""
        self.Function = ToolCallFunction(d.get("function") or {})


class Message(GoStruct):
    FIELDS = (("role", "Role", False), ("content", "Content", False), ("thinking", "Thinking", "value"),
              ("images", "Images", "value"), ("tool_calls", "ToolCalls", "value"),
              ("tool_name", "ToolName", "value"), ("tool_call_id", "ToolCallID", "value"))

    def __init__(self, d: dict):
        self.Role = str(d.get("role") or "").lower()      # Message.UnmarshalJSON lower-cases the role
        content = d.get("content")
        if content is not None and not isinstance(content, str):
            raise TypeError("message content must be a string for Ollama")
        self.Content = content or ""
        self.Thinking = d.get("thinking") or ""
        self.Images: list = []
        self.ToolCalls = [ToolCall(tc) for tc in d.get("tool_calls") or []]
        self.ToolName = d.get("tool_name") or d.get("name") or ""
        self.ToolCallID = d.get("tool_call_id") or ""


def collate(msgs: list[Message]) -> tuple[str, list[Message]]:
    """Ollama's ``collate``: merge consecutive same-role messages (not ``tool``); join system messages."""
    system: list[str] = []
    out: list[Message] = []
    for m in msgs:
        if m.Role == "system":
            system.append(m.Content)
        if out and out[-1].Role == m.Role and m.Role != "tool":
            out[-1].Content += "\n\n" + m.Content
        else:
            out.append(m)
    return "\n\n".join(system), out


def template_values(messages: list[dict], tools: list[dict] | None = None,
                    modelfile_system: str | None = None) -> dict:
    """The values Ollama's ``/api/chat`` passes to a ``.Messages`` template, for ``messages`` and
    ``tools`` in the OpenAI / Hugging Face JSON shape."""
    msgs = [Message(m) for m in messages]
    if msgs and msgs[0].Role != "system" and modelfile_system:
        msgs.insert(0, Message({"role": "system", "content": modelfile_system}))
    system, collated = collate(msgs)
    return {"System": system, "Messages": collated, "Tools": [Tool(t) for t in tools or []], "Response": "",
            "Think": False, "IsThinkSet": False, "Query": "", "Document": "", "Instruction": ""}


def render_chat(template: str, messages: list[dict], tools: list[dict] | None = None,
                modelfile_system: str | None = None) -> str:
    """The prompt Ollama builds from ``template`` for one ``/api/chat`` request."""
    from qcompile.packaging.gotemplate import render
    return render(template, template_values(messages, tools, modelfile_system))
