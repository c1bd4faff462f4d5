"""Every fixed text and name of the packaging stage, in one place.

The Ollama template skeleton is the Qwen ChatML conversation loop in Go's template language; the pieces
that differ between models (system block, tool list, default system prompt, generation prompt) are
measured from the model's own Jinja template (``chat_template.probe``) and spliced in as literal text.
"""
from __future__ import annotations

MODELFILE = "Modelfile"
MANIFEST = "manifest.json"
LMSTUDIO_DIR = "lmstudio"
DEFAULT_PUBLISHER = "qcompile"
TARGETS = ("ollama", "lmstudio")

# generation_config.json key -> Ollama PARAMETER name and type (Ollama's documented parameters)
GENERATION_PARAMETERS: dict[str, tuple[str, type]] = {
    "temperature": ("temperature", float),
    "top_p": ("top_p", float),
    "top_k": ("top_k", int),
    "min_p": ("min_p", float),
    "repetition_penalty": ("repeat_penalty", float),
}

# ChatML turn markers: a model starting a new turn has finished its answer
CHATML_STOPS = ("<|im_start|>", "<|im_end|>")
# Qwen's end-of-document token; base models end with it, instruct models list it as an eos id too
DOCUMENT_END = "<|endoftext|>"

# ---- the Ollama template ------------------------------------------------------------------------------
# <<slot>>s are literal model text: measured from the Jinja template (system block, tools, generation
# prompt) or ChatML constants checked against it. Layout newlines are removed by "{{-" only where the
# text they trim is layout (a trim marker eats all adjacent whitespace, so none touches a slot's edge).
#
# Semantics, matching Qwen2.5's Jinja template:
# * the first message, when it is a system message, fills the system block; without one the block shows
#   the model's default system prompt (Ollama also injects it through SYSTEM, so both paths agree);
# * with tools the block also carries the tool list (one JSON object per tool);
# * later system messages, user messages and assistant messages without tool calls: one ChatML turn each;
# * an assistant message with tool calls: its text, then one <tool_call> JSON per call;
# * consecutive tool results share one user turn, each wrapped in <tool_response>;
# * a final assistant message is left open (Ollama continues it, like transformers'
#   continue_final_message); otherwise the generation prompt follows.
OLLAMA_TEMPLATE = """\
{{- /* Written by qcompile from the model's chat template (Qwen ChatML<<tools_note>>). */ -}}
{{- if .Messages }}
{{- $first := index .Messages 0 }}
{{- $sys := eq $first.Role "system" }}
<<system_block>>
{{- $prev := "" }}
{{- range $i, $m := .Messages }}
{{- $rest := slice $.Messages $i }}
{{- $last := eq (len $rest) 1 }}
{{- if or (eq .Role "user") (and (eq .Role "system") (ne $i 0)) (and (eq .Role "assistant") (not .ToolCalls)) }}\
<<turn_open>>{{ .Role }}<<turn_role_end>>{{ .Content }}{{ if or (not $last) (ne .Role "assistant") }}<<turn_close>>{{ end }}
{{- else if eq .Role "assistant" }}<<turn_open>>assistant{{ if .Content }}<<turn_role_end>>{{ .Content }}{{ end }}
{{- range .ToolCalls }}<<call_open>>{{ .Function.Name }}<<call_middle>>{{ json .Function.Arguments }}<<call_close>>
{{- end }}{{ if not $last }}<<turn_close>>{{ end }}
{{- else if eq .Role "tool" }}
{{- if ne $prev "tool" }}<<turn_open>>user{{ end }}<<response_open>>{{ .Content }}<<response_close>>
{{- if $last }}<<turn_close>>{{ else if ne (index $rest 1).Role "tool" }}<<turn_close>>{{ end }}
{{- end }}
{{- $prev = .Role }}
{{- end }}
{{- if ne $prev "assistant" }}<<gen>>{{ end }}
{{- end }}"""

SYSTEM_BLOCK_TOOLS = """\
{{- if .Tools }}
{{- if $sys }}<<sys_open>>{{ $first.Content }}<<tools_with_system>>{{ else }}<<tools_without_system>>{{ end }}
{{- range $j, $t := .Tools }}{{ if $j }}<<tool_sep>>{{ end }}<<tool_json>>{{ end }}<<tools_outro>>\
{{ else if $sys }}<<sys_open>>{{ $first.Content }}<<sys_close>>{{ else }}<<default_block>>{{ end }}"""

SYSTEM_BLOCK_PLAIN = """\
{{- if $sys }}<<sys_open>>{{ $first.Content }}<<sys_close>>{{ else }}<<default_block>>{{ end }}"""

# how one tool is written: Jinja's `tool | tojson` has the OpenAI shape {"type", "function"}; the outer
# object keeps Python's spacing here, the function schema can only go through Ollama's (Go's) encoder
TOOL_JSON = {
    "tool": '{"type": {{ json $t.Type }}, "function": {{ json $t.Function }}}',
    "function": "{{ json $t.Function }}",
}

# ChatML pieces of the conversation loop, checked against the Jinja template by the probes
CHATML = {
    "turn_open": "<|im_start|>",
    "turn_role_end": "\n",
    "turn_close": "<|im_end|>\n",
    "call_open": '\n<tool_call>\n{"name": "',
    "call_middle": '", "arguments": ',
    "call_close": "}\n</tool_call>",
    "response_open": "\n<tool_response>\n",
    "response_close": "\n</tool_response>",
}

MODELFILE_HEADER = """\
# Modelfile for {name}, written by qcompile {version}.
# Source model: {source}{license}
# Register it with Ollama:  ollama create {ollama_name} -f {modelfile}
"""

MODEL_CARD = """\
---
{front_matter}---

# {model_name} GGUF ({scheme})

{model_name} quantized to {scheme} by [qcompile](https://pypi.org/project/qcompile/) {version}, for
llama.cpp-based runtimes such as LM Studio and Ollama.

* Source model: {source_line}
* License: {license_line}
* Quantization: {scheme} ({method}{calibration}), {bits_per_weight:.2f} bits per weight

## File

| file | size | sha256 |
|---|---|---|
| `{file}` | {size_human} ({size_bytes} bytes) | `{sha256}` |

## Quality

{quality}

## How it was made

```
{command}
```
"""
