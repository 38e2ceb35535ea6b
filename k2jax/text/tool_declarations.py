"""Tool declarations as the K2.5 family's tokenizer writes them: a TypeScript-style namespace.

K2.5 and later render `tools` for the `tool_declare` turn as

    # Tools

    ## functions
    namespace functions {
    // DESCRIPTION
    type NAME = (_: {
      // PARAM DESCRIPTION
      required_param: string,
      optional_param?: number
    }) => any;
    }

(K2 Thinking uses compact JSON instead). JSON Schema maps onto TypeScript types: scalars by name
(`integer` -> `number`), `array` -> `Array<T>`, `enum` and `anyOf` and type lists -> unions,
objects -> `{...}` with required properties first, each group sorted by name, and
`additionalProperties` as an index signature; `$defs` become `interface`s before the function
and `$ref`s their names (`"#"` the function's own parameters). Descriptions, defaults and the
string, number and array bounds become `//` comments above what they describe.

`typescript_declarations` raises `UnsupportedSchema` for a schema it cannot express (an unknown
`$ref`, an enum whose values contradict its type, ...); the tokenizer then falls back to the JSON
form, and so does `k2jax.text.chat_template`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

INDENT = "  "
FIELD_SEPARATOR = ",\n"
_BOUNDS = {"string": ("maxLength", "minLength", "pattern"), "number": ("maximum", "minimum"),
           "integer": ("maximum", "minimum")}
_TYPE_NAMES = {"string": "string", "number": "number", "integer": "number",
               "boolean": "boolean", "null": "null", "object": "{}", "array": "Array<any>"}


class UnsupportedSchema(ValueError):
    """A JSON Schema the TypeScript form cannot express."""


def comment(text: str, indent: str = "") -> str:
    """`text` as `//` lines at `indent`; empty lines stay empty."""
    return "\n".join(f"{indent}// {line}" if line else "" for line in text.split("\n"))


class _Definitions:
    """The `$defs` met while reading one function's parameters, for `$ref`s to name."""

    def __init__(self):
        self.schemas: dict[str, Any] = {}
        self.refers_to_root = False

    def add(self, defs) -> None:
        if isinstance(defs, Mapping):
            self.schemas.update(defs)

    def name_of(self, ref) -> str:
        if ref == "#":
            self.refers_to_root = True
            return "parameters"
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            name = ref.rsplit("/", 1)[-1]
            if name not in self.schemas:
                raise UnsupportedSchema(f"$ref {ref!r}: no such definition")
            return name
        raise UnsupportedSchema(f"$ref {ref!r}: only '#' and '#/$defs/NAME' are supported")


class _Type:
    """One schema node: its TypeScript text (`render`) and the comment lines above a field of
    this type (`doc`: description, then its bounds)."""

    def __init__(self, schema: Mapping, bounds: Sequence[str] = ()):
        self.description = schema.get("description", "")
        self.bounds = {key: schema[key] for key in bounds if key in schema}

    def render(self, indent: str = "") -> str:
        raise NotImplementedError

    def doc(self, indent: str) -> str:
        lines = []
        if self.description:
            lines.append(comment(self.description, indent))
        if self.bounds:
            lines.append(indent + "// " + ", ".join(f"{k}: {v}" for k, v in sorted(self.bounds.items())))
        return "".join(line + "\n" for line in lines)


class _Scalar(_Type):
    def __init__(self, name: str, schema: Mapping | None = None):
        super().__init__(schema or {}, _BOUNDS.get(name, ()))
        self.name = name

    def render(self, indent: str = "") -> str:
        return "number" if self.name == "integer" else self.name


class _Field:
    """A property of an object: `// docs` then `name?: type`."""

    def __init__(self, name: str, type_: _Type, optional: bool, default: Any = None):
        self.name, self.type, self.optional, self.default = name, type_, optional, default

    def render(self, indent: str) -> str:
        lines = self.type.doc(indent)
        if self.default is not None:
            # Numbers and booleans as Python writes them, everything else as JSON.
            shown = (repr(self.default) if isinstance(self.default, (int, float, bool))
                     else json.dumps(self.default, ensure_ascii=False))
            lines += f"{indent}// Default: {shown}\n"
        return f"{lines}{indent}{self.name}{'?' if self.optional else ''}: {self.type.render(indent)}"


class _Object(_Type):
    def __init__(self, schema: Mapping, defs: _Definitions | None):
        super().__init__(schema)
        self.fields: list[_Field] = []
        self.extra: Any = None
        if not schema:
            return
        if "$defs" in schema and defs is not None:
            defs.add(schema["$defs"])
        self.extra = schema.get("additionalProperties")
        if isinstance(self.extra, Mapping):
            self.extra = parse(self.extra, defs)
        properties = schema.get("properties")
        if properties is None:
            return
        required = set(schema.get("required", []))
        self.fields = [_Field(name, parse(prop, defs), name not in required,
                              prop.get("default") if isinstance(prop, Mapping) else None)
                       for name, prop in properties.items()]

    def render(self, indent: str = "") -> str:
        ordered = (sorted((f for f in self.fields if not f.optional), key=lambda f: f.name)
                   + sorted((f for f in self.fields if f.optional), key=lambda f: f.name))
        inner = indent + INDENT
        parts = [f.render(inner) for f in ordered]
        if self.extra is not None:
            if self.extra is True:
                value = "any"
            elif self.extra is False:
                value = "never"
            elif isinstance(self.extra, _Type):
                value = self.extra.render(inner)
            else:
                raise UnsupportedSchema(f"additionalProperties {self.extra!r}")
            parts.append(f"{inner}[k: string]: {value}")
        if not parts:
            return "{}"
        return "{\n" + FIELD_SEPARATOR.join(parts) + "\n" + indent + "}"


class _Array(_Type):
    def __init__(self, schema: Mapping, defs: _Definitions | None):
        super().__init__(schema, ("minItems", "maxItems"))
        items = schema.get("items")
        self.item = parse(items, defs) if items else _Scalar("any")

    def render(self, indent: str = "") -> str:
        inner = indent + INDENT
        item_doc = self.item.doc(inner)
        if not item_doc:
            return f"Array<{self.item.render(indent)}>"
        return f"Array<\n{item_doc}{inner}{self.item.render(inner)}\n{indent}>"


def _enum_type(declared) -> str | None:
    """The scalar type an enum's values must have: its `type`, or the non-null one of two."""
    if not isinstance(declared, list):
        return declared
    if len(declared) == 1:
        return declared[0]
    if len(declared) == 2 and "null" in declared:
        return declared[0] if declared[0] != "null" else declared[1]
    raise UnsupportedSchema(f"enum of type {declared}")


_ENUM_CHECKS = {"string": lambda v: isinstance(v, str),
                "number": lambda v: isinstance(v, (int, float)),
                "integer": lambda v: isinstance(v, int),
                "boolean": lambda v: isinstance(v, bool)}


class _Enum(_Type):
    def __init__(self, schema: Mapping):
        super().__init__(schema)
        self.values = schema["enum"]
        if "type" in schema:
            check = _ENUM_CHECKS.get(_enum_type(schema["type"]))
            for value in self.values:
                if value is not None and check is not None and not check(value):
                    raise UnsupportedSchema(f"enum value {value!r} is not a {schema['type']}")

    def render(self, indent: str = "") -> str:
        return " | ".join(f'"{v}"' if isinstance(v, str) else str(v) for v in self.values)


class _AnyOf(_Type):
    def __init__(self, schema: Mapping, defs: _Definitions | None):
        super().__init__(schema)
        self.options = [parse(option, defs) for option in schema["anyOf"]]

    def render(self, indent: str = "") -> str:
        return " | ".join(option.render(indent) for option in self.options)


class _TypeList(_Type):
    def __init__(self, schema: Mapping):
        super().__init__(schema)
        try:
            self.names = [_TYPE_NAMES[name] for name in schema["type"]]
        except (KeyError, TypeError):
            raise UnsupportedSchema(f"type list {schema['type']!r}") from None

    def render(self, indent: str = "") -> str:
        return " | ".join(self.names)


class _Ref(_Type):
    def __init__(self, schema: Mapping, defs: _Definitions):
        super().__init__(schema)
        self.name = defs.name_of(schema["$ref"])

    def render(self, indent: str = "") -> str:
        return self.name


def parse(schema, defs: _Definitions | None = None) -> _Type:
    """One JSON Schema node to its type."""
    if isinstance(schema, bool):  # `true` admits anything; `false` nothing, written as null
        return _Scalar("any" if schema else "null")
    if not isinstance(schema, Mapping):
        raise UnsupportedSchema(f"schema {schema!r} is not an object")
    if "$ref" in schema and defs is not None:
        return _Ref(schema, defs)
    if "anyOf" in schema:
        return _AnyOf(schema, defs)
    if "enum" in schema:
        return _Enum(schema)
    if "type" in schema:
        kind = schema["type"]
        if isinstance(kind, list):
            return _TypeList(schema)
        if kind == "object":
            return _Object(schema, defs)
        if kind == "array":
            return _Array(schema, defs)
        if not isinstance(kind, str):
            raise UnsupportedSchema(f"type {kind!r}")
        return _Scalar(kind, schema)
    if not schema:
        return _Scalar("any")
    raise UnsupportedSchema(f"schema {dict(schema)!r} has no type, enum, anyOf or $ref")


def function_declaration(function: Mapping) -> str:
    """One OpenAI function (`name`, `description`, `parameters`) as `type NAME = (_: ...) => any;`
    preceded by its interfaces and description."""
    defs = _Definitions()
    parameters = _Object(function.get("parameters") or {}, defs)
    interfaces = []
    if defs.refers_to_root:
        fields = FIELD_SEPARATOR.join(f.render(INDENT) for f in parameters.fields)
        interfaces.append("interface parameters {" + (f"\n{fields}\n" if fields else "") + "}")
    for name, schema in dict(defs.schemas).items():
        body = parse(schema, defs).render()
        description = schema.get("description", "") if isinstance(schema, Mapping) else ""
        interfaces.append((comment(description) + "\n" if description else "")
                          + f"interface {name} {body}")
    argument = "parameters" if defs.refers_to_root else parameters.render()
    name = function.get("name", "function")
    description = function.get("description")
    parts = ["\n".join(interfaces), comment(description) if description else "",
             f"type {name} = (_: {argument}) => any;"]
    return "\n".join(part for part in parts if part)


def typescript_declarations(tools: Sequence[Mapping]) -> str:
    """The `tool_declare` text of OpenAI `tools` (only `type: function` entries count; others,
    such as plugins, are left out); "" when there is no function to declare."""
    functions = [function_declaration(tool["function"]) for tool in tools or ()
                 if tool.get("type") == "function" and tool.get("function")]
    if not functions:
        return ""
    return "# Tools\n\n## functions\nnamespace functions {\n" + "\n".join(functions) + "\n}\n"
