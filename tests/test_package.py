"""--package: the Ollama Modelfile and its template, the LM Studio folder, manifest.json, atomicity."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REAL_TOKENIZER, SHARED, run_cli

from qcompile.packaging import (
    chat_template,
    gojson,
    gotemplate,
    lmstudio,
    ollama,
    ollama_api,
)

# ---- a parser for Ollama's documented Modelfile format ------------------------------------------------
# Instructions FROM PARAMETER TEMPLATE SYSTEM ADAPTER LICENSE MESSAGE REQUIRES, case-insensitive; `#` comment
# lines; values run to the end of the line, or are "quoted", or span lines as """triple-quoted""".

INSTRUCTIONS = {"from", "parameter", "template", "system", "adapter", "license", "message", "requires"}
PARAMETERS = {"num_ctx": int, "repeat_last_n": int, "repeat_penalty": float, "temperature": float, "seed": int,
              "stop": str, "num_predict": int, "draft_num_predict": int, "top_k": int, "top_p": float,
              "min_p": float}
ROLES = {"system", "user", "assistant"}


class ModelfileError(ValueError):
    pass


def parse_modelfile(text: str) -> list[tuple[str, object]]:
    """``[(instruction, value)]``; PARAMETER values are ``(name, typed value)``, MESSAGE ``(role, text)``."""
    out: list[tuple[str, object]] = []
    i, n = 0, len(text)
    while i < n:
        if text[i] in " \t\r\n":
            i += 1
            continue
        if text[i] == "#":
            i = text.find("\n", i) + 1 or n
            continue
        j = i
        while j < n and text[j].isalpha():
            j += 1
        word = text[i:j].lower()
        if word not in INSTRUCTIONS or j >= n or text[j] not in " \t":
            raise ModelfileError(f"unknown instruction at {text[i:i + 20]!r}")
        i = _skip_blanks(text, j)
        extra = None
        if word in ("parameter", "message"):
            j = i
            while j < n and (text[j].isalnum() or text[j] == "_"):
                j += 1
            extra = text[i:j]
            if word == "parameter" and extra not in PARAMETERS:
                raise ModelfileError(f"unknown parameter {extra!r}")
            if word == "message" and extra not in ROLES:
                raise ModelfileError(f"invalid message role {extra!r}")
            if j >= n or text[j] not in " \t":
                raise ModelfileError(f"{word} {extra}: missing value")
            i = _skip_blanks(text, j)
        value, i = _value(text, i)
        if word == "parameter":
            value = (extra, _typed(extra, value))
        elif word == "message":
            value = (extra, value)
        elif word == "requires" and not re.fullmatch(r"v?\d+\.\d+\.\d+", value):
            raise ModelfileError(f"REQUIRES {value!r} is not a version")
        out.append((word, value))
    if not any(w == "from" for w, _ in out):
        raise ModelfileError("no FROM line")
    return out


def _typed(name: str, value: str) -> object:
    typ = PARAMETERS[name]
    if typ is int and not re.fullmatch(r"-?\d+", value):
        raise ModelfileError(f"parameter {name}: {value!r} is not an int")
    try:
        return typ(value)
    except ValueError:
        raise ModelfileError(f"parameter {name}: {value!r} is not a {typ.__name__}") from None


def _skip_blanks(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t":
        i += 1
    return i


def _value(text: str, i: int) -> tuple[str, int]:
    if text.startswith('"""', i):
        end = text.find('"""', i + 3)
        if end < 0:
            raise ModelfileError('unterminated """')
        value, i = text[i + 3:end], end + 3
    elif text.startswith('"', i):
        end = text.find('"', i + 1)
        if end < 0 or "\n" in text[i:end]:
            raise ModelfileError('unterminated "')
        value, i = text[i + 1:end], end + 1
    else:
        end = text.find("\n", i)
        end = len(text) if end < 0 else end
        value, i = text[i:end].strip(), end
        if not value:
            raise ModelfileError("empty value")
        return value, i
    rest_end = text.find("\n", i)
    if text[i:None if rest_end < 0 else rest_end].strip():
        raise ModelfileError(f"text after a quoted value: {text[i:i + 20]!r}")
    return value, i


def commands(parsed, word):
    return [v for w, v in parsed if w == word]


@pytest.mark.parametrize("bad", [
    "FROM ./m.gguf\nPARAMETER temprature 0.7\n",          # not a documented parameter
    "FROM ./m.gguf\nPARAMETER top_k 0.5\n",               # top_k is an int
    "FROM ./m.gguf\nPARAMETER temperature warm\n",        # temperature is a float
    'FROM ./m.gguf\nTEMPLATE """{{ .Prompt }}\n',         # unterminated """
    "FROM ./m.gguf\nMESSAGE tool hi\n",                   # not a message role
    "FROM ./m.gguf\nQUANTIZE q4\n",                       # not an instruction
    "PARAMETER stop \"<|im_end|>\"\n",                    # no FROM
    'FROM ./m.gguf\nSYSTEM """hi""" trailing\n',
])
def test_modelfile_parser_rejects_malformed_files(bad):
    with pytest.raises(ModelfileError):
        parse_modelfile(bad)


def test_modelfile_parser_reads_the_documented_forms():
    text = ('# comment\nfrom llama3.2\nParameter temperature 1\nPARAMETER num_ctx 4096\nPARAMETER stop "AI:"\n'
            'SYSTEM You are Mario.\nTEMPLATE """{{ if .System }}S\n{{ end }}"""\nMESSAGE user Is Toronto in Canada?\n'
            'LICENSE """\nMIT\n"""\nREQUIRES 0.14.0\n')
    assert parse_modelfile(text) == [
        ("from", "llama3.2"), ("parameter", ("temperature", 1.0)), ("parameter", ("num_ctx", 4096)),
        ("parameter", ("stop", "AI:")), ("system", "You are Mario."), ("template", "{{ if .System }}S\n{{ end }}"),
        ("message", ("user", "Is Toronto in Canada?")), ("license", "\nMIT\n"), ("requires", "0.14.0")]


# ---- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def fake_ollama(tmp_path, monkeypatch):
    """An `ollama` first on PATH that records its arguments (and exits with $FAKE_OLLAMA_EXIT), so no test
    ever talks to a real Ollama."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    log = tmp_path / "ollama-args.json"
    script = bin_dir / "ollama"
    script.write_text(f"""#!{shutil.which('python3') or '/usr/bin/python3'}
import json, os, sys
json.dump(sys.argv[1:], open({str(log)!r}, "w"))
code = int(os.environ.get("FAKE_OLLAMA_EXIT", "0"))
if code:
    print("Error: could not connect to ollama app, is it running?", file=sys.stderr)
sys.exit(code)
""")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return log


@pytest.fixture
def qwen_chat_model(tiny_models, tmp_path) -> Path:
    """The tiny Qwen2.5 checkpoint with the real Qwen2.5 chat template (tools, default system prompt) and
    Qwen2.5-Instruct's generation_config."""
    if not REAL_TOKENIZER.is_dir():
        pytest.skip(f"{SHARED} is absent (the real Qwen2.5 tokenizer lives there)")
    d = tmp_path / "Qwen2.5-Tiny-Instruct"
    shutil.copytree(tiny_models["qwen2.5"], d)
    real = json.loads((REAL_TOKENIZER / "tokenizer_config.json").read_text())
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = real["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    ids = {t["content"]: t["id"] for t in json.loads((d / "tokenizer.json").read_text())["added_tokens"]}
    (d / "generation_config.json").write_text(json.dumps({
        "do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05,
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]}))
    return d


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- Ollama: the Modelfile ----------------------------------------------------------------------------

def test_modelfile_parses_and_points_at_the_gguf(qwen_chat_model, tmp_path, fake_ollama):
    out = tmp_path / "o"
    assert run_cli(qwen_chat_model, "--quant", "Q8_0", "--no-verify", "--out", out, "-q", "--package", "ollama") == 0
    parsed = parse_modelfile((out / "Modelfile").read_text(encoding="utf-8"))
    (src,) = commands(parsed, "from")
    assert src == "./Qwen2.5-Tiny-Instruct-Q8_0.gguf"
    assert (out / src).is_file()  # relative to the Modelfile, as Ollama resolves it
    params = commands(parsed, "parameter")
    stops = [v for k, v in params if k == "stop"]
    assert stops == ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    assert {k: v for k, v in params if k != "stop"} == {"temperature": 0.7, "top_p": 0.8, "top_k": 20,
                                                         "repeat_penalty": 1.05}
    assert commands(parsed, "system") == ["You are Qwen, created by Alibaba Cloud. You are a helpful assistant."]
    (template,) = commands(parsed, "template")
    assert ".Tools" in template and "<tool_call>" in template and "<tool_response>" in template
    # the template read back from the file renders like the model's own template
    messages = [{"role": "user", "content": "Hi"}]
    tpl = chat_template.load(qwen_chat_model)
    assert ollama_api.render_chat(template, messages, None, "You are Qwen, created by Alibaba Cloud. You are a "
                                  "helpful assistant.") == tpl.render(messages, add_generation_prompt=True)
    pkg = json.loads((out / "report.json").read_text())["package"]
    assert pkg["ollama"]["name"] == "qwen2.5-tiny-instruct:q8_0"
    assert pkg["ollama"]["template"]["equivalent"] and pkg["ollama"]["template"]["tools"]
    # the fake ollama on PATH was asked to register exactly this Modelfile
    assert json.loads(fake_ollama.read_text()) == ["create", "qwen2.5-tiny-instruct:q8_0", "-f",
                                                   str(out / "Modelfile")]
    assert pkg["ollama"]["create"]["ok"] is True


def test_plain_chatml_model_gets_no_tools_and_no_system(tiny_models, tmp_path):
    out = tmp_path / "o"
    assert run_cli(tiny_models["qwen3"], "--quant", "Q8_0", "--no-verify", "--out", out, "-q", "--package", "ollama") == 0
    parsed = parse_modelfile((out / "Modelfile").read_text())
    assert commands(parsed, "system") == [] and ".Tools" not in commands(parsed, "template")[0]
    assert [v for k, v in commands(parsed, "parameter")] == ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]


def _with_chat_template(src: Path, dst: Path, template: str) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


def test_template_difference_is_warned_and_recorded(tiny_models, tmp_path, capsys):
    """A ChatML template whose assistant turns carry a marker the Qwen loop does not write: the build goes
    on (the Modelfile is still usable) but says so, and report.json records it."""
    d = _with_chat_template(tiny_models["qwen2"], tmp_path / "marked", (
        "{%- for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}[A]{% endif %}"
        "{{ m.content }}<|im_end|>\n{% endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"))
    out = tmp_path / "o"
    assert run_cli(d, "--quant", "Q8_0", "--no-verify", "--out", out, "-q", "--package", "ollama") == 0
    err = capsys.readouterr().err
    assert "warning: the Ollama template differs from the model's chat template" in err and "[A]" in err
    info = json.loads((out / "report.json").read_text())["package"]["ollama"]["template"]
    assert info["equivalent"] is False and info["mismatches"]


def test_non_chatml_template_is_refused_before_quantizing(tiny_models, tmp_path, capsys):
    d = _with_chat_template(tiny_models["qwen2"], tmp_path / "llama", (
        "{% for m in messages %}[INST] {{ m.content }} [/INST]{% endfor %}"))
    out = tmp_path / "o"
    assert run_cli(d, "--quant", "Q8_0", "--no-verify", "--out", out, "-q", "--package", "ollama") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the chat template is not Qwen ChatML" in err
    assert list(out.iterdir()) == []


# ---- Ollama: the template renders what the Jinja template renders --------------------------------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather <now> & later",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"}},
        "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Local time",
                                         "parameters": {"type": "object", "properties": {}}}}
# How Ollama's Go JSON encoder writes them, by hand from its rules (api/types.go + encoding/json): no spaces,
# <>& escaped, `required` before `properties` (struct order), the unknown `default` key dropped, a number
# decoded as float64 (2.0 -> 2)
WEATHER_GO = ('{"name":"get_weather","description":"Current weather \\u003cnow\\u003e \\u0026 later",'
              '"parameters":{"type":"object","required":["city"],"properties":{"city":{"type":"string",'
              '"description":"City name"},"unit":{"type":"string","enum":["celsius","fahrenheit"]}}}}')
TIME_GO = '{"name":"get_time","description":"Local time","parameters":{"type":"object","properties":{}}}'
ARGS = {"city": "Paris", "days": 2.0, "unit": "celsius"}
ARGS_GO = '{"city":"Paris","days":2,"unit":"celsius"}'
GO_JSON = [(WEATHER, '{"type": "function", "function": ' + WEATHER_GO + "}"),
           (TIME, '{"type": "function", "function": ' + TIME_GO + "}"), (ARGS, ARGS_GO), ({}, "{}")]

DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
CONVERSATIONS = {
    "tools: system, user, tool call, tool result, user": ([
        {"role": "system", "content": "You check the weather."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
            "name": "get_weather", "arguments": ARGS}}]},
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "user", "content": "Thanks! And tomorrow?"}], [WEATHER, TIME]),
    "tools: default system, text + two calls, two results, answer": ([
        {"role": "user", "content": "Weather and time?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": ARGS}},
            {"type": "function", "function": {"name": "get_time", "arguments": {}}}]},
        {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "12:00"},
        {"role": "assistant", "content": "Sunny at noon."}, {"role": "user", "content": "Great"}], [WEATHER, TIME]),
    "no tools: system, user, assistant, user": ([
        {"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Bonjour"}, {"role": "user", "content": "Thanks\n\nbye"}], None),
    "no tools: default system prompt": ([{"role": "user", "content": "Who are you?"}], None),
}


@pytest.fixture(scope="module")
def real_tokenizer():
    if not REAL_TOKENIZER.is_dir():
        pytest.skip(f"{SHARED} is absent (the real Qwen2.5 tokenizer lives there)")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(REAL_TOKENIZER)


@pytest.fixture(scope="module")
def qwen_template() -> str:
    if not REAL_TOKENIZER.is_dir():
        pytest.skip(f"{SHARED} is absent (the real Qwen2.5 tokenizer lives there)")
    return ollama.build_template(chat_template.probe(chat_template.load(REAL_TOKENIZER)))


def _expected(tok, messages, tools) -> str:
    """transformers' rendering, with each JSON value swapped for the bytes Ollama's encoder writes: the one
    difference a Go template cannot avoid (see ollama.jinja_as_ollama)."""
    text = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    for value, go in GO_JSON if tools else []:
        py = json.dumps(value, ensure_ascii=False)
        assert value == {} or py in text, py
        text = text.replace(py, go)
    return text


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("injected", [True, False], ids=["SYSTEM-injected", "no-SYSTEM"])
def test_ollama_template_renders_like_the_jinja_template(real_tokenizer, qwen_template, name, injected):
    messages, tools = CONVERSATIONS[name]
    want = _expected(real_tokenizer, messages, tools)
    got = ollama_api.render_chat(qwen_template, messages, tools, DEFAULT_SYSTEM if injected else None)
    assert got == want


def test_template_check_reports_a_difference(real_tokenizer, qwen_template):
    """The build-time check is not a rubber stamp: a template missing one newline fails it."""
    tpl = chat_template.load(REAL_TOKENIZER)
    spec = chat_template.probe(tpl)
    assert ollama.check_template(qwen_template, tpl, spec, DEFAULT_SYSTEM).equal
    broken = qwen_template.replace("<tool_response>\n", "<tool_response>", 1)
    res = ollama.check_template(broken, tpl, spec, DEFAULT_SYSTEM)
    assert not res.equal and "tool" in res.mismatches[0]


# ---- the Go engine agrees with the Python evaluator -----------------------------------------------------

@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    """tests/ollama_render.go built with the Go toolchain: Go's own text/template over Ollama's types."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("no Go toolchain on PATH (apt-get install golang-go) to cross-check the template evaluator")
    tmp = tmp_path_factory.mktemp("gobin")
    exe = tmp / "ollama_render"
    env = {**os.environ, "GO111MODULE": "off"}  # one stdlib-only file: no module needed
    if "HOME" not in env:  # the build cache defaults to $HOME/.cache
        env.setdefault("GOCACHE", str(tmp / "gocache"))
        env.setdefault("GOPATH", str(tmp / "gopath"))
    built = subprocess.run([go, "build", "-o", str(exe), str(Path(__file__).with_name("ollama_render.go"))],
                           env=env, capture_output=True, text=True, check=False)
    assert built.returncode == 0, built.stderr

    def render(template: str, messages, tools=None, system=None) -> str:
        req = {"template": template, "messages": messages, "tools": tools or [], "system": system or ""}
        p = subprocess.run([str(exe)], input=json.dumps(req), capture_output=True, text=True, check=False)
        if p.returncode:
            raise gotemplate.TemplateError(p.stderr)
        return p.stdout
    return render


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_go_text_template_renders_our_template_identically(go_render, qwen_template, name):
    messages, tools = CONVERSATIONS[name]
    for system in (DEFAULT_SYSTEM, None):
        assert ollama_api.render_chat(qwen_template, messages, tools, system) == \
            go_render(qwen_template, messages, tools, system)


MSGS = [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"}, {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a", "tool_calls": [{"function": {"name": "f", "arguments": {
            "z": 1.5, "a": [1, "x<y"], "n": {"b": 1e-7, "a": 1e21}}}}]},
        {"role": "tool", "content": "r1"}, {"role": "tool", "content": "r2"}]
# (template, what Go's text/template prints for it over MSGS with tools [WEATHER])
SYNTAX = [
    ("a  {{- 1 -}}  b {{- /* c */ -}}\n c{{-3}}", "a1bc-3"),
    ("{{ range $i, $m := .Messages }}{{ $i }}{{ .Role }};{{ end }}", "0system;1user;2assistant;3tool;4tool;"),
    ("{{ $x := 0 }}{{ range .Messages }}{{ $x = .Role }}{{ end }}{{ $x }}", "tool"),
    ("{{ if $y := 1 }}{{ $y }}{{ end }}", "1"),
    ("{{ if eq .System \"s\" }}A{{ else if .Tools }}B{{ else }}C{{ end }}", "A"),
    ("{{ len .Messages }} {{ len (slice .Messages 3) }} {{ (index .Messages 1).Content }}", "5 2 u1\n\nu2"),
    ("{{ and 0 (index .Messages 99) }}|{{ or 0 \"\" \"z\" }}|{{ not .Tools }}", "0|z|false"),
    ("{{ range .Messages }}{{ range .ToolCalls }}{{ .Function.Arguments }}{{ json .Function.Arguments }}{{ end }}"
     + "{{ end }}", '{"z":1.5,"a":[1,"x\\u003cy"],"n":{"a":1e+21,"b":1e-7}}' * 2),
    ("{{ range .Tools }}{{ .Function }}{{ end }}", WEATHER_GO),
    ("{{ range .Messages }}{{ else }}none{{ end }}{{ range .Nothing }}x{{ else }}empty{{ end }}", "empty"),
    ('{{ print "a\\tb" `raw\\n` 3 }}', "a\tbraw\\n3"),
    ("{{ ne (index .Messages 3).Role (index .Messages 4).Role }}", "false"),
]


@pytest.fixture(params=["python", "go"])
def engine(request):
    """Our evaluator over the emulated Ollama values, or Go's text/template over Ollama's types: the
    expectations below hold for both (the Go half skips without a Go toolchain)."""
    if request.param == "go":
        return request.getfixturevalue("go_render")
    return ollama_api.render_chat


@pytest.mark.parametrize("template,want", SYNTAX, ids=[str(i) for i in range(len(SYNTAX))])
def test_evaluator_follows_go_semantics(template, want, engine):
    assert engine(template, MSGS, [WEATHER]) == want


@pytest.mark.parametrize("template", ["{{ index .Messages 9 }}", "{{ .Nope }}{{ range .Messages }}{{ .Nope }}{{ end }}",
                                      "{{ if .Messages }}", "{{ eq 1 \"a\" }}", "{{ nosuchfunc 1 }}"])
def test_evaluator_fails_where_go_fails(template, engine):
    with pytest.raises(gotemplate.TemplateError):
        engine(template, MSGS)


ODD_TOOLS = [
    {"type": "function", "function": {"name": "odd", "parameters": {
        "type": "object", "$defs": {}, "required": [],
        "properties": {"z": {"type": ["string", "null"], "items": {}, "properties": {}, "enum": []},
                       "a": {"anyOf": [{"type": "integer"}, {"type": "object", "properties": {"q": {"type": "number"}}}],
                             "description": "tab\tquote\" é \u2028 </tag>", "minimum": 0}}}}},
    {"type": "function", "function": {"name": "bare", "description": ""}},
]
ODD_CALLS = [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "odd", "arguments": {
    "z": None, "b": [1, 2.5, -3e-9, 1e300, True, {"y": "ü", "x": []}], "a": "\u0007"}}}]}]


def test_odd_tool_schemas_and_arguments_encode_as_in_go(go_render):
    template = "{{ range .Tools }}{{ json . }}|{{ .Function }}\n{{ end }}" \
               "{{ range .Messages }}{{ range .ToolCalls }}{{ json .Function.Arguments }}{{ end }}{{ end }}"
    assert ollama_api.render_chat(template, ODD_CALLS, ODD_TOOLS) == go_render(template, ODD_CALLS, ODD_TOOLS)


def test_model_text_that_looks_like_template_syntax_stays_text(engine):
    """A default system prompt with "{{" in it is model text, not a Go action."""
    spec = chat_template.ChatSpec("Use {{ .Prompt }} and }} {{- as is", "<|im_start|>system\n", "<|im_end|>\n",
                                  "<|im_start|>assistant\n", None)
    template = ollama.build_template(spec)
    want = ("<|im_start|>system\nUse {{ .Prompt }} and }} {{- as is<|im_end|>\n"
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    messages = [{"role": "user", "content": "hi"}]
    assert engine(template, messages) == want


def test_go_json_encoding():
    assert gojson.go_json({"b": 1, "a": [True, None, "<&>\u2028\n\x01"]}) == \
        '{"a":[true,null,"\\u003c\\u0026\\u003e\\u2028\\n\\u0001"],"b":1}'
    assert [gojson.go_json(x) for x in (1.0, 0.1, 1e20, 1e21, 1e-6, 1e-7, 1.5e-10, 123456789.0, -0.0)] == \
        ["1", "0.1", "100000000000000000000", "1e+21", "0.000001", "1e-7", "1.5e-10", "123456789", "-0"]
    assert gojson.go_json(gojson.OrderedMap([("z", 1), ("a", 2)])) == '{"z":1,"a":2}'


# ---- LM Studio, manifest, report -----------------------------------------------------------------------

@pytest.fixture
def hub_snapshot(tiny_models, tmp_path) -> Path:
    """The tiny checkpoint laid out like a huggingface_hub cache snapshot of Qwen/Qwen2.5-0.5B-Instruct."""
    snap = tmp_path / "hub" / "models--Qwen--Qwen2.5-0.5B-Instruct" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_models["qwen2.5"], snap)
    (snap / "README.md").write_text("---\nlicense: apache-2.0\nlanguage:\n- en\n---\n# Qwen2.5\n")
    return snap


def test_lmstudio_layout_model_card_and_manifest(hub_snapshot, tmp_path):
    out = tmp_path / "o"
    args = [str(hub_snapshot), "--quant", "Q8_0", "--out", str(out), "-q", "--package", "all",
            "--eval-ctx", "32", "--eval-tokens", "96"]
    assert run_cli(*args) == 0
    gguf = out / "Qwen2.5-0.5B-Instruct-Q8_0.gguf"
    folder = out / "lmstudio" / "Qwen" / "Qwen2.5-0.5B-Instruct-GGUF"
    lm_gguf = folder / "Qwen2.5-0.5B-Instruct-Q8_0.gguf"
    assert lm_gguf.read_bytes() == gguf.read_bytes()
    assert os.path.samefile(lm_gguf, gguf)  # hard-linked, not a second copy
    rep = json.loads((out / "report.json").read_text())
    card = (folder / "README.md").read_text()
    front = card.split("---\n")[1]
    assert "base_model: Qwen/Qwen2.5-0.5B-Instruct\n" in front and "license: apache-2.0\n" in front
    assert shlex.join(["qcompile", *args]) in card
    ref = rep["metrics"]["reference"]
    for text in (f"{ref['ppl_fp']:.4f} -> {ref['ppl_quant']:.4f}", f"{ref['kld_mean']:.5f}",
                 f"{100 * ref['top1']:.2f}%", rep["artifact"]["sha256"], f"{gguf.stat().st_size:,} bytes"):
        assert text in card, text
    # manifest: every file the run wrote (all of out/ but itself), each size and sha256 as on disk
    manifest = json.loads((out / "manifest.json").read_text())
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert [f["path"] for f in manifest["files"]] == on_disk
    for f in manifest["files"]:
        assert f["bytes"] == (out / f["path"]).stat().st_size and f["sha256"] == _sha(out / f["path"]), f["path"]
    assert {f["path"] for f in rep["package"]["files"]} == set(on_disk) - {gguf.name, "report.json"}
    assert rep["package"]["lmstudio"] == {"folder": "lmstudio/Qwen/Qwen2.5-0.5B-Instruct-GGUF", "gguf": "hardlink"}


def test_lmstudio_copies_when_hard_links_fail(tiny_models, tmp_path, monkeypatch):
    def no_link(src, dst, *a, **k):
        raise OSError(18, "Invalid cross-device link")
    monkeypatch.setattr(os, "link", no_link)
    out = tmp_path / "o"
    assert run_cli(tiny_models["qwen2"], "--quant", "Q8_0", "--no-verify", "--out", out, "-q", "--package", "lmstudio") == 0
    lm = out / "lmstudio" / "qcompile" / "qwen2-GGUF" / "qwen2-Q8_0.gguf"
    assert not os.path.samefile(lm, out / "qwen2-Q8_0.gguf") and _sha(lm) == _sha(out / "qwen2-Q8_0.gguf")
    rep = json.loads((out / "report.json").read_text())
    assert rep["package"]["lmstudio"]["gguf"] == "copy"
    assert "Not verified" in (lm.parent / "README.md").read_text()
    assert not (out / "Modelfile").exists()
    assert sorted(p.name for p in out.iterdir()) == ["lmstudio", "manifest.json", "qwen2-Q8_0.gguf", "report.json"]


def test_package_needs_gguf(tiny_models, tmp_path, capsys):
    for to in ("onnx", "openvino"):
        out = tmp_path / to
        assert run_cli(tiny_models["qwen2"], "--to", to, "--out", out, "--package", "ollama") == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("qcompile: error: --package needs --to gguf"), err
        assert not out.exists()


def test_failed_ollama_create_is_reported(tiny_models, tmp_path, monkeypatch, capsys, fake_ollama):
    monkeypatch.setenv("FAKE_OLLAMA_EXIT", "1")
    out = tmp_path / "o"
    assert run_cli(tiny_models["qwen2"], "--quant", "Q8_0", "--no-verify", "--out", out, "-q", "--package", "ollama") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ollama create qwen2:q8_0" in err[0] and "could not connect" in err[0], err
    # the files are complete (the command can be rerun by hand) and the report says what happened
    assert json.loads(fake_ollama.read_text())[:2] == ["create", "qwen2:q8_0"]
    create = json.loads((out / "report.json").read_text())["package"]["ollama"]["create"]
    assert create["ok"] is False and create["returncode"] == 1
    assert (out / "manifest.json").is_file() and (out / "Modelfile").is_file()


def test_existing_package_output_needs_force(tiny_models, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "Modelfile").write_text("FROM old\n")
    assert run_cli(tiny_models["qwen2"], "--quant", "Q8_0", "--no-verify", "--out", out, "-q", "--package", "ollama") == 1
    assert "Modelfile already exists (use --force" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile"]   # refused before quantizing
    assert run_cli(tiny_models["qwen2"], "--quant", "Q8_0", "--no-verify", "--out", out, "-q", "--package", "ollama",
                   "--force") == 0
    assert "FROM ./qwen2-Q8_0.gguf" in (out / "Modelfile").read_text()


@pytest.mark.parametrize("where", ["while staging", "after renaming"])
def test_failure_leaves_no_package_files(tiny_models, tmp_path, monkeypatch, capsys, where):
    from qcompile import packaging

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(*((lmstudio, "model_card") if where == "while staging" else (packaging, "write_manifest")),
                        disk_full)
    out = tmp_path / "o"
    assert run_cli(tiny_models["qwen2"], "--quant", "Q8_0", "--no-verify", "--out", out, "-q", "--package", "all") == 1
    assert "No space left on device" in capsys.readouterr().err
    # what a run without --package leaves: the GGUF and its report, no Modelfile, folder, manifest or temp file
    assert sorted(p.name for p in out.iterdir()) == ["qwen2-Q8_0.gguf", "report.json"]
    assert "package" not in json.loads((out / "report.json").read_text())
