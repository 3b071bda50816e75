"""The Ollama TEMPLATE for gpt-oss: Harmony written in Go's text/template language.

It renders exactly what ``gptoss.harmony.render_prompt_text`` renders for the same conversation
(tests/test_modelfile_template.py runs it through Go's text/template and compares), given what
Ollama hands a template: ``.Messages`` (Role, Content, Thinking, ToolCalls, ToolName, ToolCallID),
``.Tools``, ``.Think``/``.ThinkLevel``/``.IsThinkSet`` and the ``currentDate`` and ``json``
functions. Everything else is Go's built-ins (eq, and, or, not, len, index, slice, printf).

Go templates cannot build values (no dict/list), so a named template cannot be handed an indent
next to a schema: the JSON-schema renderers are written out once per nesting depth (without
their source indentation, to keep the Modelfile small), for ``MAX_SCHEMA_DEPTH`` levels of
objects; deeper objects render as ``any``.

Output is written only through string constants inside ``{{- ... -}}`` actions, so the layout of
this source never leaks into the prompt.

Known limits of the template itself (Ollama's own are listed in the conformance test's FORCED):
objects nested deeper than MAX_SCHEMA_DEPTH, ``oneOf`` inside array items (rendered as the plain
type), a JSON ``null`` as items/default (read as absent), and ``nullable`` adding ``| null``
unless the type list already has "null" (openai-harmony looks for "null" in the rendered text).
"""

from __future__ import annotations

import functools

from gptoss import harmony

# Levels of objects rendered as TypeScript, the parameters object included; deeper ones are `any`.
MAX_SCHEMA_DEPTH = 6

_MAP = "map[string]interface {}"  # what Go's encoding/json decodes a JSON object into
_LIST = "[]interface {}"


def _ind(depth: int) -> str:
    """An action writing the indent of schema depth `depth` (4 spaces a level), or nothing."""
    return f'{{{{- "{"    " * depth}" -}}}}' if depth else ""


_HEAD = r"""{{- /* gpt-oss Harmony prompt (gptoss-toolchain); mirrors gptoss/harmony.py. */ -}}
{{- "<|start|>system<|message|>IDENTITY\nKnowledge cutoff: CUTOFF\nCurrent date: " -}}
{{- currentDate -}}
{{- /* think false: no Reasoning line; "low"/"high": that level; true, "medium", unset: medium */ -}}
{{- if or (not .IsThinkSet) .Think -}}
  {{- "\n\nReasoning: " -}}
  {{- if and .Think (or (eq .ThinkLevel "low") (eq .ThinkLevel "high")) -}}{{- .ThinkLevel -}}{{- else -}}{{- "medium" -}}{{- end -}}
{{- end -}}
{{- "\n\n# Valid channels: analysis, commentary, final. Channel must be included for every message." -}}
{{- if .Tools -}}{{- "\nCalls to these tools must go to the commentary channel: 'functions'." -}}{{- end -}}
{{- "<|end|>" -}}
{{- /* developer message: system and developer messages as instructions, then the tools */ -}}
{{- $instructions := false -}}
{{- range .Messages -}}{{- if or (eq .Role "system") (eq .Role "developer") -}}{{- $instructions = true -}}{{- end -}}{{- end -}}
{{- if or $instructions .Tools -}}
  {{- "<|start|>developer<|message|>" -}}
  {{- if $instructions -}}
    {{- "# Instructions\n\n" -}}
    {{- $first := true -}}
    {{- range .Messages -}}
      {{- if or (eq .Role "system") (eq .Role "developer") -}}
        {{- if not $first -}}{{- "\n\n" -}}{{- end -}}
        {{- .Content -}}
        {{- $first = false -}}
      {{- end -}}
    {{- end -}}
  {{- end -}}
  {{- if and $instructions .Tools -}}{{- "\n\n" -}}{{- end -}}
  {{- if .Tools -}}
    {{- "# Tools\n\n## functions\n\nnamespace functions {\n\n" -}}
    {{- range .Tools -}}
      {{- template "tool_description" .Function.Description -}}
      {{- "type " -}}{{- .Function.Name -}}{{- " = " -}}
      {{- template "parameters" .Function.Parameters -}}
    {{- end -}}
    {{- "} // namespace functions" -}}
  {{- end -}}
  {{- "<|end|>" -}}
{{- end -}}
{{- /* the conversation; analysis of turns before the last user message is dropped */ -}}
{{- $lastUser := -1 -}}
{{- range $i, $m := .Messages -}}{{- if eq $m.Role "user" -}}{{- $lastUser = $i -}}{{- end -}}{{- end -}}
{{- range $i, $m := .Messages -}}
  {{- if eq $m.Role "user" -}}
    {{- "<|start|>user<|message|>" -}}{{- $m.Content -}}{{- "<|end|>" -}}
  {{- else if eq $m.Role "assistant" -}}
    {{- /* text beside a tool call is the analysis before it (thinking wins when both are given) */ -}}
    {{- $analysis := $m.Thinking -}}
    {{- if $m.ToolCalls -}}{{- $analysis = or $m.Thinking $m.Content -}}{{- end -}}
    {{- if and $analysis (gt $i $lastUser) -}}
      {{- "<|start|>assistant<|channel|>analysis<|message|>" -}}{{- $analysis -}}{{- "<|end|>" -}}
    {{- end -}}
    {{- range $m.ToolCalls -}}
      {{- "<|start|>assistant to=functions." -}}{{- .Function.Name -}}{{- "<|channel|>commentary json<|message|>" -}}
      {{- if .Function.Arguments -}}{{- json .Function.Arguments -}}{{- else -}}{{- "{}" -}}{{- end -}}
      {{- "<|call|>" -}}
    {{- end -}}
    {{- if and (not $m.ToolCalls) (or $m.Content (not $m.Thinking)) -}}
      {{- "<|start|>assistant<|channel|>final<|message|>" -}}{{- $m.Content -}}{{- "<|end|>" -}}
    {{- end -}}
  {{- else if eq $m.Role "tool" -}}
    {{- /* the tool's name: tool_name, else the earlier call with this tool_call_id, else the last call */ -}}
    {{- $name := $m.ToolName -}}
    {{- if not $name -}}
      {{- $byID := "" -}}
      {{- $last := "" -}}
      {{- range $j, $p := $.Messages -}}
        {{- if lt $j $i -}}
          {{- range $p.ToolCalls -}}
            {{- $last = .Function.Name -}}
            {{- if and $m.ToolCallID (eq .ID $m.ToolCallID) -}}{{- $byID = .Function.Name -}}{{- end -}}
          {{- end -}}
        {{- end -}}
      {{- end -}}
      {{- $name = or $byID $last -}}
    {{- end -}}
    {{- "<|start|>functions." -}}{{- $name -}}{{- " to=assistant<|channel|>commentary<|message|>" -}}{{- $m.Content -}}{{- "<|end|>" -}}
  {{- end -}}
{{- end -}}
{{- "<|start|>assistant" -}}
"""

# A tool description becomes one "// " comment per line (Rust's str::lines: "\n" or "\r\n" ends a
# line, a final line ending adds no line). Go templates cannot split strings: walk it byte by byte.
_TOOL_DESCRIPTION = r"""
{{- define "tool_description" -}}{{- if . -}}{{- "// " -}}{{- template "description_rest" . -}}{{- end -}}{{- end -}}
{{- define "description_rest" -}}
  {{- if not . -}}{{- "\n" -}}
  {{- else -}}
    {{- $c := slice . 0 1 -}}
    {{- if eq $c "\n" -}}{{- template "description_newline" (slice . 1) -}}
    {{- else if and (eq $c "\r") (gt (len .) 1) (eq (slice . 1 2) "\n") -}}{{- template "description_newline" (slice . 2) -}}
    {{- else -}}{{- $c -}}{{- template "description_rest" (slice . 1) -}}
    {{- end -}}
  {{- end -}}
{{- end -}}
{{- define "description_newline" -}}{{- "\n" -}}{{- if . -}}{{- "// " -}}{{- template "description_rest" . -}}{{- end -}}{{- end -}}
"""

# Shared pieces: type unions ("type": [...]) and string enums.
_SHARED = r"""
{{- define "type_union" -}}
  {{- $first := true -}}
  {{- range . -}}
    {{- if eq (printf "%T" .) "string" -}}
      {{- if not $first -}}{{- " | " -}}{{- end -}}
      {{- $first = false -}}
      {{- if eq . "integer" -}}{{- "number" -}}{{- else -}}{{- . -}}{{- end -}}
    {{- end -}}
  {{- end -}}
  {{- if $first -}}{{- "any" -}}{{- end -}}
{{- end -}}
{{- define "enum_or_string" -}}
  {{- $first := true -}}
  {{- if eq (printf "%T" .) "[]interface {}" -}}
    {{- range . -}}
      {{- if eq (printf "%T" .) "string" -}}
        {{- if not $first -}}{{- " | " -}}{{- end -}}
        {{- $first = false -}}
        {{- "\"" -}}{{- . -}}{{- "\"" -}}
      {{- end -}}
    {{- end -}}
  {{- end -}}
  {{- if $first -}}{{- "string" -}}{{- end -}}
{{- end -}}
{{- define "parameters" -}}
  {{- if eq .Type "object" -}}
    {{- "(_: {\n" -}}
    {{- $required := .Required -}}
    {{- $props := .Properties -}}
    {{- if eq (printf "%T" $props) "*api.ToolPropertiesMap" -}}{{- $props = $props.ToMap -}}{{- end -}}
    {{- range $key, $p := $props -}}
      {{- if $p.Description -}}{{- "// " -}}{{- $p.Description -}}{{- "\n" -}}{{- end -}}
      {{- $key -}}
      {{- $isRequired := false -}}
      {{- range $required -}}{{- if eq . $key -}}{{- $isRequired = true -}}{{- end -}}{{- end -}}
      {{- if not $isRequired -}}{{- "?" -}}{{- end -}}
      {{- ": " -}}{{- template "property_1" $p -}}{{- ",\n" -}}
    {{- end -}}
    {{- "}) => any;\n\n" -}}
  {{- else if and (not .Type) (not .Properties) -}}{{- "() => any;\n\n" -}}
  {{- else if eq .Type "array" -}}
    {{- "(_: " -}}{{- if .Items -}}{{- template "schema_0" .Items -}}{{- "[]" -}}{{- else -}}{{- "Array<any>" -}}{{- end -}}{{- ") => any;\n\n" -}}
  {{- else if eq .Type "string" -}}{{- "(_: string) => any;\n\n" -}}
  {{- else if or (eq .Type "number") (eq .Type "integer") -}}{{- "(_: number) => any;\n\n" -}}
  {{- else if eq .Type "boolean" -}}{{- "(_: boolean) => any;\n\n" -}}
  {{- else -}}{{- "(_: any) => any;\n\n" -}}
  {{- end -}}
{{- end -}}
"""

# property_D: the TypeScript type of an Ollama ToolProperty whose object members sit at depth D.
# Ollama keeps only type, description, enum, items and (nested) properties of a property.
_PROPERTY = r"""
{{- define "property_D" -}}
  {{- $n := len .Type -}}
  {{- if eq $n 0 -}}{{- "any" -}}
  {{- else if gt $n 1 -}}{{- template "type_union" .Type -}}
  {{- else -}}
    {{- $t := index .Type 0 -}}
    {{- if eq $t "object" -}}OBJECT
    {{- else if eq $t "array" -}}
      {{- if .Items -}}{{- template "schema_D" .Items -}}{{- "[]" -}}{{- else -}}{{- "Array<any>" -}}{{- end -}}
    {{- else if eq $t "string" -}}{{- template "enum_or_string" .Enum -}}
    {{- else if or (eq $t "number") (eq $t "integer") -}}{{- "number" -}}
    {{- else if eq $t "boolean" -}}{{- "boolean" -}}
    {{- else -}}{{- "any" -}}
    {{- end -}}
  {{- end -}}
{{- end -}}
"""

_PROPERTY_OBJECT = r"""
      {{- if .Description -}}IND{{- "// " -}}{{- .Description -}}{{- "\n" -}}{{- end -}}
      {{- "{\n" -}}
      {{- $props := .Properties -}}
      {{- if eq (printf "%T" $props) "*api.ToolPropertiesMap" -}}{{- $props = $props.ToMap -}}{{- end -}}
      {{- range $key, $p := $props -}}
        {{- if $p.Description -}}IND{{- "// " -}}{{- $p.Description -}}{{- "\n" -}}{{- end -}}
        IND{{- $key -}}{{- "?: " -}}{{- template "property_NEXT" $p -}}{{- ",\n" -}}
      {{- end -}}
      IND{{- "}" -}}"""

# schema_D: the TypeScript type of a raw JSON schema (what Ollama keeps of "items": the decoded
# JSON, maps iterated in key order) whose object members sit at depth D.
_SCHEMA = r"""
{{- define "schema_D" -}}
  {{- if ne (printf "%T" .) "MAP" -}}{{- "any" -}}
  {{- else -}}
    {{- $t := index . "type" -}}
    {{- if eq (printf "%T" $t) "LIST" -}}{{- template "type_union" $t -}}
    {{- else if ne (printf "%T" $t) "string" -}}{{- "any" -}}
    {{- else if eq $t "object" -}}OBJECT
    {{- else if eq $t "array" -}}
      {{- $items := index . "items" -}}
      {{- if $items -}}{{- template "schema_D" $items -}}{{- "[]" -}}{{- else -}}{{- "Array<any>" -}}{{- end -}}
    {{- else if eq $t "string" -}}{{- template "enum_or_string" (index . "enum") -}}
    {{- else if or (eq $t "number") (eq $t "integer") -}}{{- "number" -}}
    {{- else if eq $t "boolean" -}}{{- "boolean" -}}
    {{- else -}}{{- "any" -}}
    {{- end -}}
  {{- end -}}
{{- end -}}
"""

_SCHEMA_OBJECT = r"""
      {{- $description := index . "description" -}}
      {{- if eq (printf "%T" $description) "string" -}}IND{{- "// " -}}{{- $description -}}{{- "\n" -}}{{- end -}}
      {{- "{\n" -}}
      {{- $required := index . "required" -}}
      {{- $props := index . "properties" -}}
      {{- if eq (printf "%T" $props) "MAP" -}}
        {{- range $key, $p := $props -}}
          {{- $isMap := eq (printf "%T" $p) "MAP" -}}
          {{- if $isMap -}}
            {{- $title := index $p "title" -}}
            {{- if eq (printf "%T" $title) "string" -}}IND{{- "// " -}}{{- $title -}}{{- "\n" -}}IND{{- "//\n" -}}{{- end -}}
            {{- $pd := index $p "description" -}}
            {{- if and (eq (printf "%T" $pd) "string") (not (index $p "oneOf")) -}}IND{{- "// " -}}{{- $pd -}}{{- "\n" -}}{{- end -}}
            {{- $examples := index $p "examples" -}}
            {{- if and (eq (printf "%T" $examples) "LIST") $examples -}}
              IND{{- "// Examples:\n" -}}
              {{- range $examples -}}{{- if eq (printf "%T" .) "string" -}}IND{{- "// - \"" -}}{{- . -}}{{- "\"\n" -}}{{- end -}}{{- end -}}
            {{- end -}}
          {{- end -}}
          IND{{- $key -}}
          {{- $isRequired := false -}}
          {{- if eq (printf "%T" $required) "LIST" -}}
            {{- range $required -}}{{- if eq (printf "%v" .) $key -}}{{- $isRequired = true -}}{{- end -}}{{- end -}}
          {{- end -}}
          {{- if not $isRequired -}}{{- "?" -}}{{- end -}}
          {{- ": " -}}{{- template "schema_NEXT" $p -}}
          {{- if $isMap -}}
            {{- if eq (printf "%v" (index $p "nullable")) "true" -}}
              {{- $pt := index $p "type" -}}
              {{- $hasNull := false -}}
              {{- if eq (printf "%T" $pt) "LIST" -}}{{- range $pt -}}{{- if eq (printf "%v" .) "null" -}}{{- $hasNull = true -}}{{- end -}}{{- end -}}{{- end -}}
              {{- if not $hasNull -}}{{- " | null" -}}{{- end -}}
            {{- end -}}
          {{- end -}}
          {{- "," -}}
          {{- if $isMap -}}
            {{- $default := index $p "default" -}}
            {{- if eq (printf "%T" $default) "string" -}}
              {{- $enum := index $p "enum" -}}
              {{- if and (eq (printf "%T" $enum) "LIST") $enum -}}{{- " // default: " -}}{{- $default -}}
              {{- else -}}{{- " // default: \"" -}}{{- $default -}}{{- "\"" -}}{{- end -}}
            {{- else if ne (printf "%T" $default) "<nil>" -}}{{- " // default: " -}}{{- json $default -}}
            {{- end -}}
          {{- end -}}
          {{- "\n" -}}
        {{- end -}}
      {{- end -}}
      IND{{- "}" -}}"""


def _depth_templates(depth: int) -> str:
    """property_<depth> and schema_<depth>; at MAX_SCHEMA_DEPTH objects render as `any`."""
    nested = depth < MAX_SCHEMA_DEPTH
    ind = _ind(depth)
    prop_object = _PROPERTY_OBJECT.replace("IND", ind).replace("NEXT", str(depth + 1)) if nested else '{{- "any" -}}'
    schema_object = _SCHEMA_OBJECT.replace("IND", ind).replace("NEXT", str(depth + 1)) if nested else '{{- "any" -}}'
    out = ""
    if depth >= 1:  # depth 0 is the parameters object itself
        out += _PROPERTY.replace("OBJECT", prop_object).replace("_D", f"_{depth}")
    out += _SCHEMA.replace("OBJECT", schema_object).replace("_D", f"_{depth}")
    out = out.replace("MAP", _MAP).replace("LIST", _LIST)
    return "\n".join(line.strip() for line in out.splitlines())


@functools.lru_cache(maxsize=None)
def harmony_template() -> str:
    """The TEMPLATE text (Go text/template), for a Modelfile or Ollama's /api/create."""
    head = _HEAD.replace("IDENTITY", harmony.DEFAULT_IDENTITY).replace("CUTOFF", harmony.DEFAULT_KNOWLEDGE_CUTOFF)
    body = _TOOL_DESCRIPTION + _SHARED + "".join(_depth_templates(d) for d in range(MAX_SCHEMA_DEPTH + 1))
    return (head.rstrip("\n") + body).rstrip("\n")
