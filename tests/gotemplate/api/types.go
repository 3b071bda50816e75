// Package api mirrors the Ollama types a chat TEMPLATE sees (ollama/ollama api/types.go and
// template/template.go): their fields, names and how they decode from JSON. Behaviour only, written
// for this test; the package is named api so that printf "%T" names types as Ollama's do.
package api

import (
	"bytes"
	"encoding/json"
	"fmt"
)

// PropertyType is a JSON schema "type": one string or a list of them.
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

// ToolProperty is what Ollama keeps of one property of a tool's parameters; every other schema
// keyword (title, default, examples, nullable, oneOf, a nested "required", ...) is dropped.
type ToolProperty struct {
	AnyOf       []ToolProperty     `json:"anyOf,omitempty"`
	Type        PropertyType       `json:"type,omitempty"`
	Items       any                `json:"items,omitempty"`
	Description string             `json:"description,omitempty"`
	Enum        []any              `json:"enum,omitempty"`
	Properties  *ToolPropertiesMap `json:"properties,omitempty"`
}

// ToolPropertiesMap keeps properties in insertion order; templates reach them through ToMap.
type ToolPropertiesMap struct {
	keys []string
	m    map[string]ToolProperty
}

// ToMap returns a plain map (a template ranges over it in key order). Nil-safe, as Ollama's is.
func (t *ToolPropertiesMap) ToMap() map[string]ToolProperty {
	if t == nil || t.m == nil {
		return nil
	}
	out := make(map[string]ToolProperty, len(t.m))
	for k, v := range t.m {
		out[k] = v
	}
	return out
}

func (t *ToolPropertiesMap) UnmarshalJSON(data []byte) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	tok, err := dec.Token()
	if err != nil {
		return err
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return fmt.Errorf("properties: expected an object")
	}
	t.keys, t.m = nil, map[string]ToolProperty{}
	for dec.More() {
		kt, err := dec.Token()
		if err != nil {
			return err
		}
		key := kt.(string)
		var v ToolProperty
		if err := dec.Decode(&v); err != nil {
			return err
		}
		if _, seen := t.m[key]; !seen {
			t.keys = append(t.keys, key)
		}
		t.m[key] = v
	}
	_, err = dec.Token()
	return err
}

// ToolPropertyPlain is a ToolProperty whose nested properties are a plain map: the shape of
// Ollama releases between nested-property support (v0.13.5) and the order-preserving types.
type ToolPropertyPlain struct {
	AnyOf       []ToolPropertyPlain          `json:"anyOf,omitempty"`
	Type        PropertyType                 `json:"type,omitempty"`
	Items       any                          `json:"items,omitempty"`
	Description string                       `json:"description,omitempty"`
	Enum        []any                        `json:"enum,omitempty"`
	Properties  map[string]ToolPropertyPlain `json:"properties,omitempty"`
}

// Tool and its parts as a template sees them (template.go's templateTool): properties as a map.
type Tool[P any] struct {
	Type     string          `json:"type"`
	Items    any             `json:"items,omitempty"`
	Function ToolFunction[P] `json:"function"`
}

type ToolFunction[P any] struct {
	Name        string                    `json:"name"`
	Description string                    `json:"description"`
	Parameters  ToolFunctionParameters[P] `json:"parameters"`
}

type ToolFunctionParameters[P any] struct {
	Type       string       `json:"type"`
	Defs       any          `json:"$defs,omitempty"`
	Items      any          `json:"items,omitempty"`
	Required   []string     `json:"required,omitempty"`
	Properties map[string]P `json:"properties"`
}

// Message is one chat message of Ollama's /api/chat.
type Message struct {
	Role       string     `json:"role"`
	Content    string     `json:"content"`
	Thinking   string     `json:"thinking,omitempty"`
	ToolCalls  []ToolCall `json:"tool_calls,omitempty"`
	ToolName   string     `json:"tool_name,omitempty"`
	ToolCallID string     `json:"tool_call_id,omitempty"`
}

type ToolCall struct {
	ID       string           `json:"id,omitempty"`
	Function ToolCallFunction `json:"function"`
}

type ToolCallFunction struct {
	Index     int            `json:"index,omitempty"`
	Name      string         `json:"name"`
	Arguments map[string]any `json:"arguments"`
}

// TemplateMessage is a message as a template sees it (template.go's templateMessage).
type TemplateMessage struct {
	Role       string
	Content    string
	Thinking   string
	Images     [][]byte
	ToolCalls  []TemplateToolCall
	ToolName   string
	ToolCallID string
}

type TemplateToolCall struct {
	ID       string
	Function TemplateToolCallFunction
}

type TemplateToolCallFunction struct {
	Index     int
	Name      string
	Arguments TemplateArgs
}

// TemplateArgs prints as JSON, like Ollama's templateArgs.
type TemplateArgs map[string]any

func (t TemplateArgs) String() string {
	if t == nil {
		return "{}"
	}
	b, _ := json.Marshal(map[string]any(t))
	return string(b)
}
