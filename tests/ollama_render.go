// Renders an Ollama chat template with Go's own text/template, for tests/test_package.py: it checks that
// qcompile's Python evaluator (qcompile/packaging/gotemplate.py) and its emulation of Ollama's values agree
// with the real engine. The types mirror Ollama's api package (api/types.go): the same fields, JSON names,
// omitempty flags and insertion-ordered maps; the template runs with Ollama's options and FuncMap.
//
// stdin: {"template": "...", "system": "...", "messages": [...], "tools": [...]}; stdout: the prompt.
package main

import (
	"bytes"
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

// orderedMap keeps JSON object keys in insertion order, like Ollama's internal/orderedmap.
type orderedMap[V any] struct {
	keys []string
	vals map[string]V
}

func (m *orderedMap[V]) UnmarshalJSON(b []byte) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	if _, err := dec.Token(); err != nil {
		return err
	}
	m.vals = map[string]V{}
	for dec.More() {
		t, err := dec.Token()
		if err != nil {
			return err
		}
		var v V
		if err := dec.Decode(&v); err != nil {
			return err
		}
		k := t.(string)
		if _, seen := m.vals[k]; !seen {
			m.keys = append(m.keys, k)
		}
		m.vals[k] = v
	}
	_, err := dec.Token()
	return err
}

func (m orderedMap[V]) MarshalJSON() ([]byte, error) {
	var b bytes.Buffer
	b.WriteByte('{')
	for i, k := range m.keys {
		if i > 0 {
			b.WriteByte(',')
		}
		kb, _ := json.Marshal(k)
		vb, err := json.Marshal(m.vals[k])
		if err != nil {
			return nil, err
		}
		b.Write(kb)
		b.WriteByte(':')
		b.Write(vb)
	}
	b.WriteByte('}')
	return b.Bytes(), nil
}

type ToolCallFunctionArguments struct{ om *orderedMap[any] }

func (t *ToolCallFunctionArguments) UnmarshalJSON(b []byte) error {
	t.om = &orderedMap[any]{}
	return json.Unmarshal(b, t.om)
}

func (t ToolCallFunctionArguments) MarshalJSON() ([]byte, error) {
	if t.om == nil {
		return []byte("{}"), nil
	}
	return json.Marshal(t.om)
}

func (t *ToolCallFunctionArguments) String() string {
	b, _ := json.Marshal(t)
	return string(b)
}

type ToolCallFunction struct {
	Index     int                       `json:"index"`
	Name      string                    `json:"name"`
	Arguments ToolCallFunctionArguments `json:"arguments"`
}

type ToolCall struct {
	ID       string           `json:"id,omitempty"`
	Function ToolCallFunction `json:"function"`
}

type Message struct {
	Role       string     `json:"role"`
	Content    string     `json:"content"`
	Thinking   string     `json:"thinking,omitempty"`
	ToolCalls  []ToolCall `json:"tool_calls,omitempty"`
	ToolName   string     `json:"tool_name,omitempty"`
	ToolCallID string     `json:"tool_call_id,omitempty"`
}

type PropertyType []string

func (pt *PropertyType) UnmarshalJSON(data []byte) error {
	var s string
	if err := json.Unmarshal(data, &s); err == nil {
		*pt = []string{s}
		return nil
	}
	var a []string
	if err := json.Unmarshal(data, &a); err != nil {
		return err
	}
	*pt = a
	return nil
}

func (pt PropertyType) MarshalJSON() ([]byte, error) {
	if len(pt) == 1 {
		return json.Marshal(pt[0])
	}
	return json.Marshal([]string(pt))
}

type ToolProperty struct {
	AnyOf       []ToolProperty             `json:"anyOf,omitempty"`
	Type        PropertyType               `json:"type,omitempty"`
	Items       any                        `json:"items,omitempty"`
	Description string                     `json:"description,omitempty"`
	Enum        []any                      `json:"enum,omitempty"`
	Properties  *orderedMap[ToolProperty] `json:"properties,omitempty"`
}

type ToolFunctionParameters struct {
	Type       string                     `json:"type"`
	Defs       any                        `json:"$defs,omitempty"`
	Items      any                        `json:"items,omitempty"`
	Required   []string                   `json:"required,omitempty"`
	Properties *orderedMap[ToolProperty] `json:"properties"`
}

type ToolFunction struct {
	Name        string                 `json:"name"`
	Description string                 `json:"description,omitempty"`
	Parameters  ToolFunctionParameters `json:"parameters"`
}

func (t *ToolFunction) String() string {
	b, _ := json.Marshal(t)
	return string(b)
}

type Tool struct {
	Type     string       `json:"type"`
	Items    any          `json:"items,omitempty"`
	Function ToolFunction `json:"function"`
}

type request struct {
	Template string    `json:"template"`
	System   string    `json:"system"`
	Messages []Message `json:"messages"`
	Tools    []Tool    `json:"tools"`
}

func main() {
	var req request
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		panic(err)
	}
	msgs := req.Messages
	// server/routes.go: the Modelfile's SYSTEM comes first unless the request starts with a system message
	if len(msgs) > 0 && msgs[0].Role != "system" && req.System != "" {
		msgs = append([]Message{{Role: "system", Content: req.System}}, msgs...)
	}
	// template/template.go: collate
	var system []string
	var collated []*Message
	for i := range msgs {
		msgs[i].Role = strings.ToLower(msgs[i].Role)
		if msgs[i].Role == "system" {
			system = append(system, msgs[i].Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == msgs[i].Role && msgs[i].Role != "tool" {
			collated[len(collated)-1].Content += "\n\n" + msgs[i].Content
		} else {
			collated = append(collated, &msgs[i])
		}
	}
	funcs := template.FuncMap{"json": func(v any) string {
		b, _ := json.Marshal(v)
		return string(b)
	}}
	tmpl := template.Must(template.New("").Option("missingkey=zero").Funcs(funcs).Parse(req.Template))
	err := tmpl.Execute(os.Stdout, map[string]any{
		"System": strings.Join(system, "\n\n"), "Messages": collated, "Tools": req.Tools, "Response": "",
		"Think": false, "IsThinkSet": false,
	})
	if err != nil {
		os.Stderr.WriteString(err.Error())
		os.Exit(3)
	}
}
