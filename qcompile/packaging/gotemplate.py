"""A minimal evaluator for the subset of Go's ``text/template`` that Ollama chat templates use.

Kept in the product, judged on its merits (with ``gojson.py`` and ``ollama_api.py``, ~900 lines): every
``--package ollama`` renders the Modelfile's TEMPLATE as an Ollama server would and the checkpoint's Jinja
template as transformers would, on a fixed set of conversations (system, multi-turn, tools, tool results),
and reports each difference in report.json (``package.ollama.template.equivalent`` / ``mismatches``) and as a
warning. A wrong chat template does not crash; it silently degrades every answer of the packaged model,
and nothing else in the chain (Ollama, llama.cpp, our KLD checks) would notice. That check is worth its
size; a test renders the same templates with Go's own ``text/template`` (tests/ollama_render.go) so the
evaluator cannot drift from Go.

Why it exists: Ollama's ``TEMPLATE`` is a Go template, and the only way to know that the template we write
renders the same prompt as the model's Jinja chat template is to render it. There is no maintained Python
implementation of Go's template language (the one PyPI package is an unversioned CGo wrapper that would
not see Ollama's typed values anyway), so this module implements exactly what our templates need, with
Go's semantics, and refuses anything else with a ``TemplateError``:

* text and actions, ``{{-`` / ``-}}`` trim markers (they eat all adjacent spaces, tabs and newlines),
  ``{{/* comments */}}``;
* ``if`` / ``else if`` / ``else`` / ``end``, ``range`` (with ``$i, $v :=`` or ``$v :=``, and ``else``);
* pipelines: ``.Field.Chain``, ``$``, ``$var.Field``, ``(sub pipeline).Field``, string / number / bool
  literals, ``|`` (the left result becomes the last argument), ``$x := ...`` and ``$x = ...``
  (assignment reaches a variable declared outside the current block, as in Go >= 1.11);
* functions ``and`` / ``or`` (short-circuit, returning an operand, as in Go >= 1.18), ``not``, ``eq``,
  ``ne``, ``lt``, ``le``, ``gt``, ``ge``, ``len``, ``index``, ``slice``, ``print`` and Ollama's ``json``.

Values: ``dict`` is a Go map (field access by key; ``range`` in sorted key order), ``list`` a slice,
objects are Go structs (field access by attribute). Printing follows ``fmt.Print``: an object with a
``go_string()`` method is a ``fmt.Stringer``. Ollama executes with ``missingkey=zero``; a missing struct
field is an error in Go and here.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qcompile.packaging.gojson import go_json


class TemplateError(Exception):
    """The template is malformed, uses something outside the supported subset, or fails to execute."""


# ---- lexing -----------------------------------------------------------------------------------------

_SPACE = " \t\r\n"


def _split(src: str) -> list[tuple[str, str]]:
    """``[("text", s) | ("action", body)]`` with trim markers already applied to the neighbouring text."""
    parts: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    while True:
        start = src.find("{{", pos)
        text = src[pos:] if start < 0 else src[pos:start]
        if trim_next:
            text = text.lstrip(_SPACE)
        if start < 0:
            parts.append(("text", text))
            return parts
        body_start = start + 2
        # "{{- " trims only when a space follows the dash ("{{-3}}" is the number -3)
        if src.startswith("-", body_start) and src[body_start + 1:body_start + 2] in tuple(_SPACE):
            text = text.rstrip(_SPACE)
            body_start += 2
        parts.append(("text", text))
        end = _action_end(src, body_start)
        body = src[body_start:end]
        trim_next = False
        if body.endswith("-") and body[-2:-1] in tuple(_SPACE):
            body, trim_next = body[:-2], True
        parts.append(("action", body.strip(_SPACE)))
        pos = end + 2


def _action_end(src: str, i: int) -> int:
    """Index of the ``}}`` closing the action that starts at ``i`` (skipping quoted strings)."""
    while i < len(src):
        c = src[i]
        if c in "\"'`":
            i = _skip_quoted(src, i)
            continue
        if src.startswith("}}", i):
            return i
        if src.startswith("/*", i):
            close = src.find("*/", i + 2)
            if close < 0:
                raise TemplateError("unclosed comment")
            i = close + 2
            continue
        i += 1
    raise TemplateError("unclosed action")


def _skip_quoted(src: str, i: int) -> int:
    q, i = src[i], i + 1
    while i < len(src):
        if src[i] == "\\" and q != "`":
            i += 2
            continue
        if src[i] == q:
            return i + 1
        if src[i] == "\n" and q != "`":
            break
        i += 1
    raise TemplateError(f"unterminated quoted string in {src[:40]!r}...")


_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<declare>:=)
  | (?P<assign>=)
  | (?P<pipe>\|)
  | (?P<lparen>\()
  | (?P<rparen>\))(?P<after>(?:\.[A-Za-z_]\w*)*)
  | (?P<comma>,)
  | (?P<string>"(?:[^"\\\n]|\\.)*"|`[^`]*`)
  | (?P<char>'(?:[^'\\\n]|\\.)+')
  | (?P<number>[-+]?(?:0[xX][0-9a-fA-F_]+|\d[\d_]*(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?))
  | (?P<field>(?:\.[A-Za-z_]\w*)+)
  | (?P<dot>\.)
  | (?P<var>\$\w*)(?P<varfields>(?:\.[A-Za-z_]\w*)*)
  | (?P<ident>[A-Za-z_]\w*)
""", re.VERBOSE)


def _tokens(body: str) -> list[tuple[str, Any]]:
    out, pos = [], 0
    while pos < len(body):
        m = _TOKEN.match(body, pos)
        if not m:
            raise TemplateError(f"unexpected {body[pos:pos + 10]!r} in action {{{{{body}}}}}")
        kind = m.lastgroup
        if kind == "after":
            kind = "rparen"
        if kind == "varfields":
            kind = "var"
        pos = m.end()
        if kind == "space":
            continue
        if kind == "rparen":
            out.append(("rparen", _chain(m.group("after"))))
        elif kind == "var":
            out.append(("var", (m.group("var"), _chain(m.group("varfields")))))
        elif kind == "field":
            out.append(("field", _chain(m.group("field"))))
        else:
            out.append((kind, m.group(kind)))
    return out


def _chain(s: str | None) -> list[str]:
    return [p for p in (s or "").split(".") if p]


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "a": "\a", "b": "\b", "f": "\f",
            "v": "\v"}


def _unquote(lit: str) -> str:
    if lit.startswith("`"):
        return lit[1:-1]
    out, i, s = [], 0, lit[1:-1]
    while i < len(s):
        c = s[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        e = s[i + 1]
        if e in _ESCAPES:
            out.append(_ESCAPES[e])
            i += 2
        elif e in "xuU":
            n = {"x": 2, "u": 4, "U": 8}[e]
            out.append(chr(int(s[i + 2:i + 2 + n], 16)))
            i += 2 + n
        else:
            raise TemplateError(f"unsupported escape \\{e} in {lit}")
    return "".join(out)


# ---- syntax tree ------------------------------------------------------------------------------------

@dataclass
class Operand:
    kind: str           # field | dot | var | literal | ident | pipeline
    value: Any = None
    chain: list[str] = field(default_factory=list)


@dataclass
class Command:
    args: list[Operand]


@dataclass
class Pipeline:
    commands: list[Command]
    decl: list[str] = field(default_factory=list)   # variables declared (:=) or assigned (=)
    assign: bool = False


@dataclass
class Text:
    text: str


@dataclass
class Action:
    pipe: Pipeline


@dataclass
class If:
    pipe: Pipeline
    body: list
    orelse: list


@dataclass
class Range:
    pipe: Pipeline
    body: list
    orelse: list


class _Parser:
    def __init__(self, src: str):
        self.parts = _split(src)
        self.i = 0

    def parse(self) -> list:
        nodes, stop = self._list()
        if stop is not None:
            raise TemplateError(f"unexpected {{{{{stop}}}}}")
        return nodes

    def _list(self) -> tuple[list, str | None]:
        """Nodes up to (and consuming) ``end`` / ``else ...``; returns them and that keyword's action."""
        nodes: list = []
        while self.i < len(self.parts):
            kind, s = self.parts[self.i]
            self.i += 1
            if kind == "text":
                if s:
                    nodes.append(Text(s))
                continue
            if s.startswith("/*"):
                if not s.endswith("*/"):
                    raise TemplateError("comment must fill its action")
                continue
            word = s.split(None, 1)[0] if s else ""
            if word in ("end", "else"):
                return nodes, s
            if word == "if":
                nodes.append(self._if(s[2:]))
            elif word == "range":
                nodes.append(self._range(s[5:]))
            elif word in ("with", "define", "template", "block", "break", "continue"):
                raise TemplateError(f"{{{{{word}}}}} is outside the supported subset")
            else:
                nodes.append(Action(_pipeline(_tokens(s))))
        return nodes, None

    def _if(self, cond: str) -> If:
        body, stop = self._list()
        node = If(_pipeline(_tokens(cond)), body, [])
        if stop is None:
            raise TemplateError("missing {{end}} for {{if}}")
        if stop.startswith("else"):
            rest = stop[4:].strip()
            if rest.startswith("if"):
                node.orelse = [self._if(rest[2:])]     # "else if" shares the outer {{end}}
                return node
            if rest:
                raise TemplateError(f"unsupported {{{{{stop}}}}}")
            node.orelse, stop = self._list()
            if stop != "end":
                raise TemplateError("missing {{end}} for {{else}}")
        return node

    def _range(self, spec: str) -> Range:
        body, stop = self._list()
        node = Range(_pipeline(_tokens(spec)), body, [])
        if stop is None:
            raise TemplateError("missing {{end}} for {{range}}")
        if stop == "else":
            node.orelse, stop = self._list()
            if stop != "end":
                raise TemplateError("missing {{end}} for {{range}} {{else}}")
        elif stop != "end":
            raise TemplateError(f"unsupported {{{{{stop}}}}} in range")
        return node


def _pipeline(toks: list[tuple[str, Any]]) -> Pipeline:
    decl, assign = [], False
    # "$a :=" / "$a, $b :=" / "$a ="
    j = 0
    names = []
    while j < len(toks) and toks[j][0] == "var" and not toks[j][1][1]:
        names.append(toks[j][1][0])
        if j + 1 < len(toks) and toks[j + 1][0] == "comma":
            j += 2
            continue
        j += 1
        break
    if names and j < len(toks) and toks[j][0] in ("declare", "assign"):
        decl, assign = names, toks[j][0] == "assign"
        toks = toks[j + 1:]
    cmds: list[Command] = []
    args: list[Operand] = []
    k = 0
    while k < len(toks):
        kind, v = toks[k]
        if kind == "pipe":
            if not args:
                raise TemplateError("empty command before |")
            cmds.append(Command(args))
            args = []
        elif kind == "lparen":
            depth, m = 1, k + 1
            while m < len(toks) and depth:
                depth += {"lparen": 1, "rparen": -1}.get(toks[m][0], 0)
                m += 1
            if depth:
                raise TemplateError("unclosed (")
            inner = _pipeline(toks[k + 1:m - 1])
            args.append(Operand("pipeline", inner, toks[m - 1][1]))
            k = m
            continue
        elif kind == "field":
            args.append(Operand("field", chain=v))
        elif kind == "dot":
            args.append(Operand("dot"))
        elif kind == "var":
            args.append(Operand("var", v[0], v[1]))
        elif kind == "string":
            args.append(Operand("literal", _unquote(v)))
        elif kind == "number":
            n = v.replace("_", "")
            args.append(Operand("literal", int(n, 0) if re.fullmatch(r"[-+]?(0[xX][0-9a-fA-F]+|\d+)", n) else float(n)))
        elif kind == "ident":
            if v in ("true", "false"):
                args.append(Operand("literal", v == "true"))
            elif v == "nil":
                args.append(Operand("literal", None))
            else:
                args.append(Operand("ident", v))
        else:
            raise TemplateError(f"unexpected {v!r}")
        k += 1
    if args:
        cmds.append(Command(args))
    if not cmds:
        raise TemplateError("missing value for command")
    return Pipeline(cmds, decl, assign)


# ---- execution --------------------------------------------------------------------------------------

def truth(v: Any) -> bool:
    """Go's notion of a true value: non-zero, non-empty, non-nil; every struct is true."""
    if v is None or v is False:
        return False
    if isinstance(v, (bool, int, float, str, list, tuple, dict)):
        return bool(v)
    return True


def go_print(v: Any) -> str:
    """``fmt.Print`` of a value, for the types the templates print."""
    if v is None:
        return "<no value>"
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if hasattr(v, "go_string"):
        return v.go_string()
    raise TemplateError(f"printing a {type(v).__name__} is outside the supported subset")


def _comparable(a: Any, b: Any) -> None:
    basic = (bool, int, float, str)
    if a is None or b is None:
        return
    if not (isinstance(a, basic) and isinstance(b, basic)) or \
            isinstance(a, str) != isinstance(b, str) or isinstance(a, bool) != isinstance(b, bool):
        raise TemplateError(f"incompatible types for comparison: {type(a).__name__} and {type(b).__name__}")


def _eq(a, *bs):
    if not bs:
        raise TemplateError("missing argument for comparison")
    for b in bs:
        _comparable(a, b)
        if a == b:
            return True
    return False


def _ordered(op: Callable[[Any, Any], bool]):
    def f(a, b):
        _comparable(a, b)
        if isinstance(a, bool):
            raise TemplateError("invalid type for comparison")
        return op(a, b)
    return f


def _len(v):
    if isinstance(v, str):
        return len(v.encode("utf-8"))   # Go strings are byte sequences
    if isinstance(v, (list, tuple, dict)):
        return len(v)
    raise TemplateError(f"len of {type(v).__name__}")


def _index(v, *keys):
    for k in keys:
        if isinstance(v, dict):
            v = v.get(k)
        elif isinstance(v, (list, tuple)):
            if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < len(v):
                raise TemplateError(f"error calling index: index out of range: {k}")
            v = v[k]
        else:
            raise TemplateError(f"can't index item of type {type(v).__name__}")
    return v


def _slice(v, *idx):
    if not isinstance(v, (list, tuple)):
        raise TemplateError(f"can't slice item of type {type(v).__name__}")
    if len(idx) > 2:
        raise TemplateError("3-index slice is outside the supported subset")
    lo = idx[0] if idx else 0
    hi = idx[1] if len(idx) > 1 else len(v)
    if not 0 <= lo <= hi <= len(v):
        raise TemplateError(f"error calling slice: index out of range: [{lo}:{hi}]")
    return list(v[lo:hi])


FUNCS: dict[str, Callable[..., Any] | None] = {
    "and": None, "or": None,  # short-circuit: evaluated by Template._logic
    "not": lambda a: not truth(a),
    "eq": _eq,
    "ne": lambda a, b: not _eq(a, b),
    "lt": _ordered(lambda a, b: a < b),
    "le": _ordered(lambda a, b: a <= b),
    "gt": _ordered(lambda a, b: a > b),
    "ge": _ordered(lambda a, b: a >= b),
    "len": _len,
    "index": _index,
    "slice": _slice,
    "print": lambda *a: "".join(go_print(x) for x in a),
    "json": go_json,  # Ollama's FuncMap: json.Marshal, errors ignored
}


class _Scope:
    """Go's variable stack: a block's declarations end at its {{end}}; ``=`` updates the nearest one."""

    def __init__(self, root: Any):
        self.vars: list[list] = [["$", root]]

    def mark(self) -> int:
        return len(self.vars)

    def pop(self, mark: int) -> None:
        del self.vars[mark:]

    def push(self, name: str, value: Any) -> None:
        self.vars.append([name, value])

    def set(self, name: str, value: Any) -> None:
        for v in reversed(self.vars):
            if v[0] == name:
                v[1] = value
                return
        raise TemplateError(f"undefined variable: {name}")

    def get(self, name: str) -> Any:
        for v in reversed(self.vars):
            if v[0] == name:
                return v[1]
        raise TemplateError(f"undefined variable: {name}")


def _field(v: Any, name: str) -> Any:
    if isinstance(v, dict):
        return v.get(name)          # missingkey=zero
    if v is None:
        raise TemplateError(f"nil pointer evaluating .{name}")
    if not hasattr(v, name) or name.startswith("_"):
        raise TemplateError(f"can't evaluate field {name} in type {type(v).__name__}")
    return getattr(v, name)


class Template:
    """A parsed Go template: ``Template(src).render(data)``."""

    def __init__(self, src: str):
        self.src = src
        self.nodes = _Parser(src).parse()

    def render(self, data: Any) -> str:
        out: list[str] = []
        self._run(self.nodes, data, _Scope(data), out)
        return "".join(out)

    def _run(self, nodes: list, dot: Any, scope: _Scope, out: list[str]) -> None:
        for n in nodes:
            if isinstance(n, Text):
                out.append(n.text)
            elif isinstance(n, Action):
                v = self._pipe(n.pipe, dot, scope)
                if not n.pipe.decl:
                    out.append(go_print(v))
            elif isinstance(n, If):
                mark = scope.mark()
                cond = truth(self._pipe(n.pipe, dot, scope))
                self._run(n.body if cond else n.orelse, dot, scope, out)
                scope.pop(mark)
            elif isinstance(n, Range):
                self._range(n, dot, scope, out)

    def _range(self, n: Range, dot: Any, scope: _Scope, out: list[str]) -> None:
        pipe = Pipeline(n.pipe.commands)        # the declared names bind per element, not to the list
        seq = self._pipe(pipe, dot, scope)
        if isinstance(seq, dict):
            items = [(k, seq[k]) for k in sorted(seq)]
        elif isinstance(seq, (list, tuple)):
            items = list(enumerate(seq))
        elif seq is None:
            items = []
        else:
            raise TemplateError(f"range can't iterate over {type(seq).__name__}")
        if not items:
            mark = scope.mark()
            self._run(n.orelse, dot, scope, out)
            scope.pop(mark)
            return
        names = n.pipe.decl
        if len(names) > 2 or n.pipe.assign:
            raise TemplateError("range takes $v := or $i, $v :=")
        for k, v in items:
            mark = scope.mark()
            if len(names) == 1:
                scope.push(names[0], v)
            elif len(names) == 2:
                scope.push(names[0], k)
                scope.push(names[1], v)
            self._run(n.body, v, scope, out)
            scope.pop(mark)

    def _pipe(self, p: Pipeline, dot: Any, scope: _Scope) -> Any:
        val, first = None, True
        for cmd in p.commands:
            val = self._command(cmd, dot, scope, None if first else (val,))
            first = False
        if p.decl:
            if len(p.decl) != 1:
                raise TemplateError("only range declares two variables")
            (scope.set if p.assign else scope.push)(p.decl[0], val)
        return val

    def _command(self, cmd: Command, dot: Any, scope: _Scope, piped: tuple | None) -> Any:
        head = cmd.args[0]
        if head.kind == "ident":
            name = head.value
            if name not in FUNCS:
                raise TemplateError(f'function "{name}" not defined')
            rest = cmd.args[1:]
            if name in ("and", "or"):
                return self._logic(name, rest, dot, scope, piped)
            args = [self._operand(a, dot, scope) for a in rest] + list(piped or ())
            try:
                return FUNCS[name](*args)
            except TypeError as e:
                raise TemplateError(f"wrong number of args for {name}: {e}") from None
        if len(cmd.args) > 1 or piped:
            raise TemplateError("can't give arguments to a non-function")
        return self._operand(head, dot, scope)

    def _logic(self, name: str, args: list[Operand], dot, scope, piped) -> Any:
        if len(args) + len(piped or ()) < 1:
            raise TemplateError(f"wrong number of args for {name}")
        thunks = [lambda a=a: self._operand(a, dot, scope) for a in args] + [lambda p=p: p for p in (piped or ())]
        v = None
        for t in thunks:
            v = t()
            if truth(v) != (name == "and"):      # and: stop at the first false; or: at the first true
                return v
        return v

    def _operand(self, a: Operand, dot: Any, scope: _Scope) -> Any:
        if a.kind == "literal":
            return a.value
        if a.kind == "dot":
            return dot
        if a.kind == "ident":
            raise TemplateError(f"function {a.value} used as a value")
        if a.kind == "field":
            v = dot
        elif a.kind == "var":
            v = scope.get(a.value)
        else:  # parenthesised pipeline
            v = self._pipe(a.value, dot, scope)
        for name in a.chain:
            v = _field(v, name)
        return v


def render(src: str, data: Any) -> str:
    """Parse and execute a Go template in one call."""
    return Template(src).render(data)
