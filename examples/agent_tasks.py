"""A deterministic synthetic agentic corpus: tasks that need tools, their tools, and a grader.

Every task is a user question answerable only through tool calls, executed on the client side:

    calculator(expression)          integer +, -, * on two operands
    lookup(city, field)             a fixed table of invented cities (population, elevation)
    convert(value, unit, to)        km <-> m, kg <-> g, h <-> min

Five kinds, one to three calls each: `calc` (one call), `lookup`, `convert`, `lookup_calc`
(a look-up, then arithmetic on its result: two calls in sequence) and `compare` (two look-ups in
parallel in one section, then their difference: three calls, two steps). A conversation in
K2 Thinking's format holds the reasoning of each step, the calls, the tool results and the
final answer, `"The answer is N."`.

`tasks(split, count, seed)` is deterministic. The train and held-out splits are disjoint by
construction: a task's operands, cities and values decide its split through a hash, so no
held-out question appears in training. `grade(task, transcript)` scores an agent's run: success
is the right final number with every tool call well formed (a declared tool, JSON object
arguments with exactly the schema's fields of the right types).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re

# 144 invented city names, two syllables each.
CITY_STARTS = ("Ar", "Bel", "Cal", "Dun", "El", "Far", "Gal", "Har", "Is", "Jor", "Kes", "Lom")
CITY_ENDS = ("den", "mora", "der", "mere", "stow", "row", "en", "low", "tra", "vik", "wick",
             "vale")
CITIES = tuple(a + b for a in CITY_STARTS for b in CITY_ENDS)
FIELDS = ("population", "elevation")
UNITS = {("km", "m"): 1000, ("m", "km"): None, ("kg", "g"): 1000, ("g", "kg"): None,
         ("h", "min"): 60, ("min", "h"): None}
KINDS = ("calc", "lookup", "convert", "lookup_calc", "compare")
SPLITS = ("train", "heldout")

TOOLS = [
    {"type": "function", "function": {
        "name": "calculator", "description": "Evaluate a + b, a - b or a * b on integers.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                       "required": ["expression"]}}},
    {"type": "function", "function": {
        "name": "lookup", "description": "A city's population or elevation.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "field": {"type": "string", "enum": list(FIELDS)}},
            "required": ["city", "field"]}}},
    {"type": "function", "function": {
        "name": "convert", "description": "Convert an integer between km/m, kg/g or h/min.",
        "parameters": {"type": "object", "properties": {
            "value": {"type": "integer"}, "unit": {"type": "string"}, "to": {"type": "string"}},
            "required": ["value", "unit", "to"]}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


class ToolError(ValueError):
    """A tool call the tools refuse: its result is the error text, sent back to the model."""


def table_value(city: str, field: str) -> int:
    """The invented table: a fixed value per (city, field), 100..9999."""
    digest = hashlib.sha256(f"{city}/{field}".encode()).digest()
    return 100 + int.from_bytes(digest[:4], "little") % 9900


def calculator(expression: str) -> int:
    match = re.fullmatch(r"\s*(-?\d+)\s*([-+*])\s*(-?\d+)\s*", expression)
    if not match:
        raise ToolError(f"cannot evaluate {expression!r}: write a + b, a - b or a * b")
    a, op, b = int(match[1]), match[2], int(match[3])
    return a + b if op == "+" else a - b if op == "-" else a * b


def lookup(city: str, field: str) -> int:
    if city not in CITIES:
        raise ToolError(f"unknown city {city!r}")
    if field not in FIELDS:
        raise ToolError(f"unknown field {field!r}")
    return table_value(city, field)


def convert(value: int, unit: str, to: str) -> int:
    if (unit, to) not in UNITS:
        raise ToolError(f"cannot convert {unit} to {to}")
    factor = UNITS[(unit, to)]
    if factor is None:
        factor = UNITS[(to, unit)]
        if value % factor:
            raise ToolError(f"{value} {unit} is not a whole number of {to}")
        return value // factor
    return value * factor


FUNCTIONS = {"calculator": calculator, "lookup": lookup, "convert": convert}


def run_tool(name: str, arguments: str) -> str:
    """Executes one call as the client would: its result text, or `error: ...`."""
    problem = call_problem(name, arguments)
    if problem:
        return f"error: {problem}"
    try:
        return str(FUNCTIONS[name](**json.loads(arguments)))
    except ToolError as e:
        return f"error: {e}"


def call_problem(name: str, arguments: str) -> str | None:
    """Why a call is not well formed (None if it is): an undeclared tool, arguments that are not
    a JSON object, or fields other than the schema's or of the wrong type."""
    if name not in SCHEMAS:
        return f"no tool named {name!r}"
    try:
        args = json.loads(arguments)
    except (TypeError, ValueError):
        return f"arguments are not JSON: {arguments!r}"
    if not isinstance(args, dict):
        return "arguments are not a JSON object"
    schema = SCHEMAS[name]
    if set(args) != set(schema["required"]):
        return f"{name} takes {sorted(schema['required'])}, got {sorted(args)}"
    for field, value in args.items():
        kind = schema["properties"][field]["type"]
        if kind == "integer" and (not isinstance(value, int) or isinstance(value, bool)):
            return f"{name}.{field} must be an integer"
        if kind == "string" and not isinstance(value, str):
            return f"{name}.{field} must be a string"
    return None


@dataclasses.dataclass(frozen=True)
class Task:
    """One question, the calls a correct agent makes (each step a list of `(name, arguments)`;
    several in one step run in parallel) and the answer."""

    kind: str
    question: str
    steps: tuple[tuple[tuple[str, dict], ...], ...]
    answer: int

    def messages(self) -> list[dict]:
        """The full conversation a correct agent has: question, reasoning and calls per step,
        tool results, final answer."""
        messages: list[dict] = [{"role": "user", "content": self.question}]
        results: list[int] = []
        for step_index, calls in enumerate(self.steps):
            ids = [f"functions.{name}:{len(results) + i}" for i, (name, _) in enumerate(calls)]
            messages.append({
                "role": "assistant", "content": "",
                "reasoning_content": _step_reasoning(self, step_index, results),
                "tool_calls": [{"id": id_, "type": "function", "function": {
                    "name": name, "arguments": json.dumps(args)}}
                    for id_, (name, args) in zip(ids, calls)]})
            for id_, (name, args) in zip(ids, calls):
                results.append(FUNCTIONS[name](**args))
                messages.append({"role": "tool", "tool_call_id": id_,
                                 "content": str(results[-1])})
        messages.append({"role": "assistant", "content": f"The answer is {self.answer}.",
                         "reasoning_content": f"The tool returned {self.answer}, so that is "
                                              "the answer."})
        return messages

    def record(self) -> dict:
        """The training record: `{"messages", "tools"}` (see `train.data`)."""
        return {"messages": self.messages(), "tools": TOOLS}


def _step_reasoning(task: Task, step: int, results: list[int]) -> str:
    """What the agent thinks before a step's calls: it names the values it is about to pass, so
    that the arguments follow from its own reasoning."""
    calls = task.steps[step]
    if len(calls) > 1:
        (_, first), (_, second) = calls
        return (f"I need the {first['field']} of {first['city']} and of {second['city']}; "
                "I look them up together.")
    name, args = calls[0]
    if name == "calculator":
        got = (f"The look-up{'s' * (len(results) > 1)} gave {' and '.join(map(str, results))}. "
               if step else "")
        return f"{got}I compute {args['expression']} with the calculator."
    if name == "lookup":
        return f"I look up the {args['field']} of {args['city']}."
    return f"I convert {args['value']} {args['unit']} to {args['to']}."


def _make(kind: str, rng: random.Random) -> Task:
    if kind == "calc":
        a, b, op = rng.randint(2, 999), rng.randint(2, 99), rng.choice("+-*")
        expression = f"{a} {op} {b}"
        return Task(kind, f"What is {expression}?", ((("calculator", {"expression":
                                                                         expression}),),),
                    calculator(expression))
    if kind == "lookup":
        city, field = rng.choice(CITIES), rng.choice(FIELDS)
        return Task(kind, f"What is the {field} of {city}?",
                    ((("lookup", {"city": city, "field": field}),),), table_value(city, field))
    if kind == "convert":
        unit, to = rng.choice(list(UNITS))
        value = rng.randint(1, 99) * (1 if UNITS[(unit, to)] else UNITS[(to, unit)])
        return Task(kind, f"How many {to} is {value} {unit}?",
                    ((("convert", {"value": value, "unit": unit, "to": to}),),),
                    convert(value, unit, to))
    if kind == "lookup_calc":
        city, field = rng.choice(CITIES), rng.choice(FIELDS)
        factor = rng.randint(2, 9)
        value = table_value(city, field)
        expression = f"{value} * {factor}"
        return Task(kind, f"What is {factor} times the {field} of {city}?",
                    ((("lookup", {"city": city, "field": field}),),
                     (("calculator", {"expression": expression}),)), value * factor)
    first, second = rng.sample(CITIES, 2)
    field = rng.choice(FIELDS)
    a, b = table_value(first, field), table_value(second, field)
    expression = f"{a} - {b}"
    return Task(kind, f"How much larger is the {field} of {first} than that of {second}?",
                ((("lookup", {"city": first, "field": field}),
                  ("lookup", {"city": second, "field": field})),
                 (("calculator", {"expression": expression}),)), a - b)


def split_of(task: Task) -> str:
    """`train` or `heldout`, from the question alone: one task in eight is held out."""
    digest = hashlib.sha256(task.question.encode()).digest()
    return "heldout" if digest[0] % 8 == 0 else "train"


def tasks(split: str, count: int, seed: int = 0) -> list[Task]:
    """`count` tasks of `split`, the kinds in turn, the same for the same arguments. Held-out
    tasks are distinct; a training corpus may repeat a question."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(f"{split}/{seed}")
    found: list[Task] = []
    seen: set[str] = set()
    attempts = 0
    while len(found) < count:
        attempts += 1
        if attempts > 200 * count + 1000:
            raise ValueError(f"cannot draw {count} distinct {split} tasks")
        task = _make(KINDS[len(found) % len(KINDS)], rng)
        if split_of(task) == split and (split == "train" or task.question not in seen):
            seen.add(task.question)
            found.append(task)
    return found


def final_number(content: str | None) -> int | None:
    """The number in `The answer is N.`, or None."""
    match = re.search(r"answer is (-?\d+)", content or "")
    return int(match[1]) if match else None


@dataclasses.dataclass(frozen=True)
class Outcome:
    success: bool
    answer: int | None
    calls: int
    problem: str | None


def grade(task: Task, final_content: str | None, calls: list[tuple[str, str]]) -> Outcome:
    """Scores one agent run: its final message's content and every `(name, arguments)` call it
    made, in order."""
    problems = [p for p in (call_problem(n, a) for n, a in calls) if p]
    answer = final_number(final_content)
    problem = (problems[0] if problems else
               None if answer == task.answer else
               f"answered {answer!r}, expected {task.answer}")
    return Outcome(problem is None, answer, len(calls), problem)


def write_corpus(path: str, count: int, seed: int = 0) -> int:
    """Writes `count` train-split records as JSONL; returns the count."""
    with open(path, "w") as f:
        for task in tasks("train", count, seed):
            f.write(json.dumps(task.record()) + "\n")
    return count


def write_tokenizer(directory: str, vocab_size: int, sample: int = 200) -> str:
    """Learns a byte-level BPE for this corpus (K2's pre-tokenizer, `vocab_size` ids with K2's
    256 control-token slots) from the text of `sample` training conversations, and writes it as
    `DIRECTORY/tiktoken.model`; returns that path.

    Bytes alone would spend most of a small model's compute on the ~800-byte tool declaration
    every prompt starts with; merges learned here cut a conversation about fourfold."""
    import os

    from k2jax.text import chat_template
    from k2jax.text.special_tokens import NUM_SPECIAL_SLOTS
    from k2jax.text.testing import train_ranks, write_tiktoken_file

    rendered = "\n".join(chat_template.render_chat(t.messages(), TOOLS)
                         for t in tasks("train", sample, seed=1))
    # Control tokens are single ids already; their texts would only waste merges. Digits stay
    # one token each: a number is then copied digit by digit with ten embeddings, which a small
    # model learns far sooner than hundreds of merged number tokens.
    # A city likewise stays two tokens, its syllables, each shared by twelve cities.
    text = re.sub(r"<\|[a-z_]+\|>|\d", "\n", rendered)
    text = re.sub("|".join(sorted(CITIES, key=len, reverse=True)),
                  lambda m: next(f"{a}\n{m[0][len(a):]}" for a in CITY_STARTS
                                 if m[0].startswith(a)), text)
    os.makedirs(directory, exist_ok=True)
    ranks = train_ranks(vocab_size - NUM_SPECIAL_SLOTS, text)
    return str(write_tiktoken_file(os.path.join(directory, "tiktoken.model"), ranks))


def main(argv: list[str] | None = None) -> None:
    import argparse
    import os

    parser = argparse.ArgumentParser(
        description="Writes DIR/corpus.jsonl (training conversations) and "
                    "DIR/tokenizer/tiktoken.model (a BPE learned on them).")
    parser.add_argument("dir", help="output directory")
    parser.add_argument("--count", type=int, default=4000, help="training conversations")
    parser.add_argument("--vocab-size", type=int, default=768,
                        help="ids in all, K2's 256 control tokens included (the agent preset's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    corpus = os.path.join(args.dir, "corpus.jsonl")
    write_corpus(corpus, args.count, args.seed)
    tokenizer = write_tokenizer(os.path.join(args.dir, "tokenizer"), args.vocab_size)
    print(f"wrote {args.count} training conversations to {corpus} and their tokenizer to "
          f"{tokenizer}")


if __name__ == "__main__":
    main()

