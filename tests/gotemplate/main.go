// Command gotemplate renders a Modelfile's TEMPLATE the way Ollama's /api/chat does, with Go's own
// text/template, for a table of conversations; tests/test_modelfile_template.py compares the
// prompts with gptoss.harmony. Behaviour follows ollama/ollama (parser/parser.go ParseFile,
// server/routes.go ChatHandler, template/template.go Parse/Execute/collate and its funcs),
// reimplemented here with the standard library only.
//
//	gotemplate -modelfile PATH -cases CASES.json [-nested ordered|plain]
//
// CASES.json: [{"name", "messages", "tools", "think", "date"}]; messages and tools as /api/chat
// takes them, think true/false/"low"/"medium"/"high" or absent, date "YYYY-MM-DD" pins currentDate
// (absent: today, as Ollama). Prints {"commands", "vars", "results": [{"name", "prompt"|"error"}]}.
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strconv"
	"strings"
	"text/template"
	"text/template/parse"
	"time"

	"gptoss.test/gotemplate/api"
)

type Command struct {
	Name string `json:"name"`
	Args string `json:"args"`
}

// ---------------------------------------------------------------------------------------------
// Modelfile parsing (parser.ParseFile): a rune state machine. A value ends at a line break once,
// trimmed, it unquotes ("...", """...""" or bare): so a """ value ends at the first """ before a
// line break. Only printable runes are kept, besides the spaces, tabs and line breaks of values.

type state int

const (
	stNil state = iota
	stName
	stValue
	stParameter
	stMessage
	stComment
)

var errInvalidCommand = errors.New(`command must be one of "from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter", "message", or "requires"`)

func isAlpha(r rune) bool   { return r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' }
func isNumber(r rune) bool  { return r >= '0' && r <= '9' }
func isSpace(r rune) bool   { return r == ' ' || r == '\t' }
func isNewline(r rune) bool { return r == '\r' || r == '\n' }

func validCommand(s string) bool {
	switch strings.ToLower(s) {
	case "from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter", "message", "requires":
		return true
	}
	return false
}

func unquote(s string) (string, bool) {
	if len(s) >= 3 && s[:3] == `"""` {
		if len(s) >= 6 && s[len(s)-3:] == `"""` {
			return s[3 : len(s)-3], true
		}
		return "", false
	}
	if len(s) >= 1 && s[0] == '"' {
		if len(s) >= 2 && s[len(s)-1] == '"' {
			return s[1 : len(s)-1], true
		}
		return "", false
	}
	return s, true
}

func nextState(r rune, cs state) (state, rune, error) {
	switch cs {
	case stNil:
		switch {
		case r == '#':
			return stComment, 0, nil
		case isSpace(r), isNewline(r):
			return stNil, 0, nil
		default:
			return stName, r, nil
		}
	case stName:
		switch {
		case isAlpha(r):
			return stName, r, nil
		case isSpace(r):
			return stValue, 0, nil
		default:
			return stNil, 0, errInvalidCommand
		}
	case stValue:
		if isNewline(r) || isSpace(r) {
			return stNil, r, nil
		}
		return stValue, r, nil
	case stParameter:
		switch {
		case isAlpha(r), isNumber(r), r == '_':
			return stParameter, r, nil
		case isSpace(r):
			return stValue, 0, nil
		default:
			return stNil, 0, io.ErrUnexpectedEOF
		}
	case stMessage:
		switch {
		case isAlpha(r):
			return stMessage, r, nil
		case isSpace(r):
			return stValue, 0, nil
		default:
			return stNil, 0, io.ErrUnexpectedEOF
		}
	case stComment:
		if isNewline(r) {
			return stNil, 0, nil
		}
		return stComment, 0, nil
	}
	return stNil, 0, errors.New("bad state")
}

func parseModelfile(rd io.Reader) ([]Command, error) {
	var cmds []Command
	var cmd Command
	var b strings.Builder
	var role string
	curr, line := stNil, 1
	br := bufio.NewReader(rd)
	for {
		r, _, err := br.ReadRune()
		if errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			return nil, err
		}
		if isNewline(r) {
			line++
		}
		next, r, err := nextState(r, curr)
		if err != nil {
			return nil, fmt.Errorf("(line %d): %w", line, err)
		}
		if next != curr {
			switch curr {
			case stName:
				if !validCommand(b.String()) {
					return nil, fmt.Errorf("(line %d): %w", line, errInvalidCommand)
				}
				switch s := strings.ToLower(b.String()); s {
				case "from":
					cmd.Name = "model"
				case "parameter":
					next = stParameter
				case "message":
					next = stMessage
					cmd.Name = s
				default:
					cmd.Name = s
				}
			case stParameter:
				cmd.Name = b.String()
			case stMessage:
				role = b.String()
			case stValue:
				s, ok := unquote(strings.TrimSpace(b.String()))
				if !ok || isSpace(r) {
					b.WriteRune(r)
					continue
				}
				if role != "" {
					s = role + ": " + s
					role = ""
				}
				cmd.Args = s
				cmds = append(cmds, cmd)
			}
			b.Reset()
			curr = next
		}
		if strconv.IsPrint(r) {
			b.WriteRune(r)
		}
	}
	switch curr {
	case stComment, stNil:
	case stValue:
		s, ok := unquote(strings.TrimSpace(b.String()))
		if !ok {
			return nil, io.ErrUnexpectedEOF
		}
		if role != "" {
			s = role + ": " + s
		}
		cmd.Args = s
		cmds = append(cmds, cmd)
	default:
		return nil, io.ErrUnexpectedEOF
	}
	for _, c := range cmds {
		if c.Name == "model" {
			return cmds, nil
		}
	}
	return nil, errors.New("no FROM line")
}

// ---------------------------------------------------------------------------------------------
// Template parsing and the functions Ollama gives templates (template.go funcs): this template
// uses json and currentDate only, so only those exist here; any other would fail to parse.

func funcs(date string) template.FuncMap {
	return template.FuncMap{
		"json": func(v any) string {
			b, _ := json.Marshal(v)
			return string(b)
		},
		// Ollama ignores the arguments and formats time.Now(); a case may pin the date instead.
		"currentDate": func(args ...string) string {
			if date != "" {
				return date
			}
			return time.Now().Format("2006-01-02")
		},
	}
}

// identifiers walks a parse tree as Ollama's template.Identifiers does, including its errors for
// actions, branches and {{ template }} calls without a pipeline.
func identifiers(n parse.Node) ([]string, error) {
	switch n := n.(type) {
	case *parse.ListNode:
		var names []string
		for _, c := range n.Nodes {
			i, err := identifiers(c)
			if err != nil {
				return names, err
			}
			names = append(names, i...)
		}
		return names, nil
	case *parse.TemplateNode:
		if n.Pipe == nil {
			return nil, errors.New("undefined template specified")
		}
		return identifiers(n.Pipe)
	case *parse.ActionNode:
		if n.Pipe == nil {
			return nil, errors.New("undefined action in template")
		}
		return identifiers(n.Pipe)
	case *parse.BranchNode:
		if n.Pipe == nil {
			return nil, errors.New("undefined branch")
		}
		names, err := identifiers(n.Pipe)
		if err != nil {
			return names, err
		}
		for _, l := range []*parse.ListNode{n.List, n.ElseList} {
			if l != nil {
				i, err := identifiers(l)
				if err != nil {
					return names, err
				}
				names = append(names, i...)
			}
		}
		return names, nil
	case *parse.IfNode:
		return identifiers(&n.BranchNode)
	case *parse.RangeNode:
		return identifiers(&n.BranchNode)
	case *parse.WithNode:
		return identifiers(&n.BranchNode)
	case *parse.PipeNode:
		var names []string
		for _, c := range n.Cmds {
			for _, a := range c.Args {
				i, err := identifiers(a)
				if err != nil {
					return names, err
				}
				names = append(names, i...)
			}
		}
		return names, nil
	case *parse.FieldNode:
		return n.Ident, nil
	case *parse.VariableNode:
		return n.Ident, nil
	}
	return nil, nil
}

func vars(t *template.Template) ([]string, error) {
	set := map[string]bool{}
	for _, tt := range t.Templates() {
		if tt.Tree == nil {
			continue
		}
		for _, n := range tt.Root.Nodes {
			v, err := identifiers(n)
			if err != nil {
				return nil, err
			}
			for _, s := range v {
				set[strings.ToLower(s)] = true
			}
		}
	}
	out := make([]string, 0, len(set))
	for s := range set {
		out = append(out, s)
	}
	sort.Strings(out)
	return out, nil
}

func parseTemplate(src, date string) (*template.Template, error) {
	return template.New("").Option("missingkey=zero").Funcs(funcs(date)).Parse(src)
}

// ---------------------------------------------------------------------------------------------
// What /api/chat does before the template runs.

type Case struct {
	Name     string          `json:"name"`
	Messages []api.Message   `json:"messages"`
	Tools    json.RawMessage `json:"tools"`
	Think    json.RawMessage `json:"think"`
	Date     string          `json:"date"`
}

// withSystem: the Modelfile's SYSTEM becomes the first message unless the request starts with one.
func withSystem(msgs []api.Message, system string) []api.Message {
	if len(msgs) > 0 && msgs[0].Role != "system" && system != "" {
		return append([]api.Message{{Role: "system", Content: system}}, msgs...)
	}
	return msgs
}

// collate merges consecutive messages of one role (not tool results) into the first, joining
// contents with a blank line; the later messages' thinking and tool calls are lost.
func collate(msgs []api.Message) []*api.Message {
	var out []*api.Message
	for i := range msgs {
		m := msgs[i]
		if len(out) > 0 && out[len(out)-1].Role == m.Role && m.Role != "tool" {
			out[len(out)-1].Content += "\n\n" + m.Content
		} else {
			out = append(out, &m)
		}
	}
	return out
}

func templateMessages(msgs []*api.Message) []*api.TemplateMessage {
	out := make([]*api.TemplateMessage, len(msgs))
	for i, m := range msgs {
		var calls []api.TemplateToolCall
		for _, tc := range m.ToolCalls {
			calls = append(calls, api.TemplateToolCall{
				ID:       tc.ID,
				Function: api.TemplateToolCallFunction{Index: tc.Function.Index, Name: tc.Function.Name, Arguments: api.TemplateArgs(tc.Function.Arguments)},
			})
		}
		out[i] = &api.TemplateMessage{Role: m.Role, Content: m.Content, Thinking: m.Thinking, ToolCalls: calls, ToolName: m.ToolName, ToolCallID: m.ToolCallID}
	}
	return out
}

// toolsFor decodes /api/chat tools into the shape templates get: nil when there are none.
func toolsFor[P any](raw json.RawMessage) ([]api.Tool[P], error) {
	if len(raw) == 0 || string(raw) == "null" {
		return nil, nil
	}
	var tools []api.Tool[P]
	if err := json.Unmarshal(raw, &tools); err != nil {
		return nil, err
	}
	if len(tools) == 0 {
		return nil, nil
	}
	return tools, nil
}

// thinkValues: Ollama's ThinkValue as Think (Bool), ThinkLevel (String) and IsThinkSet.
func thinkValues(raw json.RawMessage) (bool, string, bool, error) {
	if len(raw) == 0 || string(raw) == "null" {
		return false, "", false, nil
	}
	var b bool
	if err := json.Unmarshal(raw, &b); err == nil {
		if b {
			return true, "medium", true, nil
		}
		return false, "", true, nil
	}
	var s string
	if err := json.Unmarshal(raw, &s); err != nil {
		return false, "", false, fmt.Errorf("think must be a boolean or a string")
	}
	return true, s, true, nil
}

type Result struct {
	Name   string `json:"name"`
	Prompt string `json:"prompt,omitempty"`
	Error  string `json:"error,omitempty"`
}

func render(src, system, nested string, c Case) (string, error) {
	t, err := parseTemplate(src, c.Date)
	if err != nil {
		return "", err
	}
	think, level, isSet, err := thinkValues(c.Think)
	if err != nil {
		return "", err
	}
	all := withSystem(c.Messages, system)
	var systems []string
	for _, m := range all {
		if m.Role == "system" {
			systems = append(systems, m.Content)
		}
	}
	msgs := templateMessages(collate(all))
	var tools any
	if nested == "plain" {
		tl, err := toolsFor[api.ToolPropertyPlain](c.Tools)
		if err != nil {
			return "", err
		}
		if tl != nil {
			tools = tl
		}
	} else {
		tl, err := toolsFor[api.ToolProperty](c.Tools)
		if err != nil {
			return "", err
		}
		if tl != nil {
			tools = tl
		}
	}
	var sb strings.Builder
	err = t.Execute(&sb, map[string]any{
		"System":     strings.Join(systems, "\n\n"),
		"Messages":   msgs,
		"Tools":      tools,
		"Response":   "",
		"Think":      think,
		"ThinkLevel": level,
		"IsThinkSet": isSet,
	})
	return sb.String(), err
}

func main() {
	modelfile := flag.String("modelfile", "", "Modelfile to take TEMPLATE and SYSTEM from")
	casesPath := flag.String("cases", "", "JSON file with the conversations")
	nested := flag.String("nested", "ordered", "nested tool properties as Ollama's ordered map (ordered) or a plain map (plain)")
	flag.Parse()

	fail := func(err error) {
		fmt.Fprintln(os.Stderr, "gotemplate:", err)
		os.Exit(1)
	}
	f, err := os.Open(*modelfile)
	if err != nil {
		fail(err)
	}
	cmds, err := parseModelfile(f)
	f.Close()
	if err != nil {
		fail(fmt.Errorf("%s: %w", *modelfile, err))
	}
	var src, system string
	for _, c := range cmds {
		switch c.Name {
		case "template":
			src = c.Args
		case "system":
			system = c.Args
		}
	}
	t, err := parseTemplate(src, "")
	if err != nil {
		fail(fmt.Errorf("TEMPLATE: %w", err))
	}
	v, err := vars(t)
	if err != nil {
		fail(fmt.Errorf("TEMPLATE: %w", err))
	}

	var cases []Case
	if *casesPath != "" {
		data, err := os.ReadFile(*casesPath)
		if err != nil {
			fail(err)
		}
		if err := json.Unmarshal(data, &cases); err != nil {
			fail(fmt.Errorf("%s: %w", *casesPath, err))
		}
	}
	results := []Result{}
	for _, c := range cases {
		prompt, err := render(src, system, *nested, c)
		if err != nil {
			results = append(results, Result{Name: c.Name, Error: err.Error()})
		} else {
			results = append(results, Result{Name: c.Name, Prompt: prompt})
		}
	}
	out, _ := json.Marshal(map[string]any{"commands": cmds, "vars": v, "results": results})
	os.Stdout.Write(out)
}
