"""The edit workload: seeded, generated Python files of about N tokens, each with one small change
to make; the answer is the whole file again, most of it copied from the prompt, which is the
case n-gram (prompt lookup) speculation is built for.

Every file has its own theme (an entity such as `Shipment` with its fields), a header (module
docstring, imports, constants), the entity's dataclass, then functions and a class drawn from
templates with seeded names and values until the file reaches the token target. Each block
records the edits that make sense on it (rename a local or a function, change a default or a
constant, add a docstring line); the task picks one.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

_NOUNS = ("order", "invoice", "shipment", "session", "record", "sensor", "reading", "ticket",
          "job", "account", "payment", "route", "message", "report", "sample", "device",
          "booking", "upload", "review", "lease")
_NUMERIC_FIELDS = ("weight", "price", "score", "size", "duration", "priority", "amount",
                   "latency", "balance", "quota")
_STATUSES = ("pending", "active", "closed", "failed", "queued", "archived")
_DOC_LINES = ("The input is not modified.", "Runs in linear time in the number of items.",
              "Safe to call from several threads: it keeps no state.",
              "Callers should validate the input first.", "See the module docstring for "
              "the format.", "Kept small on purpose: it is on the hot path.")
_RENAMES = {"total": "running_total", "result": "outcome", "groups": "buckets",
            "kept": "selected", "parts": "fields", "lines": "rows", "count": "tally",
            "ranked": "ordered", "text": "rendered", "data": "payload", "problems": "issues",
            "items": "entries", "seen": "visited", "best": "top"}


@dataclass(frozen=True, slots=True)
class Theme:
    """The entity one file is about, and the names derived from it."""

    noun: str  # "shipment"
    numeric: str  # a float field: "weight"
    status: str  # the default status value

    @property
    def cls(self) -> str:
        return "".join(part.capitalize() for part in self.noun.split("_"))

    @property
    def plural(self) -> str:
        return f"{self.noun}s"

    @property
    def upper(self) -> str:
        return self.noun.upper()


@dataclass(slots=True)
class Block:
    """A piece of a file and the edit instructions that apply to it."""

    code: str
    edits: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class EditTask:
    """One request of the workload: a file, the change to make, and the file's token count."""

    code: str
    instruction: str
    num_code_tokens: int

    def prompt(self) -> str:
        return (f"{self.instruction}\n\n```python\n{self.code}```\n\n"
                "Answer with only the full updated file in one ```python block: no "
                "explanation before or after it.")

    def max_tokens(self, ratio: float) -> int:
        """Room for the whole file again, its fences and the change, but not much more."""
        return math.ceil(ratio * self.num_code_tokens)


def edit_tasks(tokenizer, num: int, file_tokens: int, seed: int) -> list[EditTask]:  # noqa: ANN001
    """`num` different files of about `file_tokens` tokens each, each with one edit; the same
    seed gives the same tasks, and the first k of a longer list are those of a shorter one."""
    rng = random.Random(seed)

    def count(code: str) -> int:
        return len(tokenizer.encode(code, add_special_tokens=False))

    tasks = []
    for _ in range(num):
        blocks = build_file(rng, count, file_tokens)
        code = _joined(blocks)
        instruction = rng.choice([edit for block in blocks for edit in block.edits])
        tasks.append(EditTask(code, instruction, count(code)))
    return tasks


def build_file(rng: random.Random, count: Callable[[str], int], target: int) -> list[Block]:
    """Header, dataclass, then random blocks until the file holds about `target` tokens (a
    block that would overshoot by more than 15% is skipped; a few skips end the file)."""
    theme = Theme(rng.choice(_NOUNS), rng.choice(_NUMERIC_FIELDS), rng.choice(_STATUSES))
    blocks = [_header(theme, rng), _dataclass(theme, rng)]
    templates = list(_TEMPLATES)
    rng.shuffle(templates)
    misses = 0
    while templates and misses < 3 and count(_joined(blocks)) < 0.9 * target:
        block = templates.pop()(theme, rng)
        if count(_joined(blocks + [block])) > 1.15 * target:
            misses += 1
            continue
        blocks.append(block)
    return blocks


def _joined(blocks: list[Block]) -> str:
    """The file: PEP 8's two blank lines between top-level blocks, a final newline."""
    return "\n\n\n".join(block.code for block in blocks) + "\n"


# ---- edits ---------------------------------------------------------------------------------


def _rename_local(function: str, name: str) -> str:
    return (f"In the function `{function}`, rename the local variable `{name}` to "
            f"`{_RENAMES[name]}`.")


def _rename_function(function: str, new: str) -> str:
    return f"Rename the function `{function}` to `{new}`, and update every call to it."


def _change_default(function: str, parameter: str, old: str, new: str) -> str:
    return (f"In `{function}`, change the default value of the parameter `{parameter}` from "
            f"{old} to {new}.")


def _add_doc_line(function: str, rng: random.Random) -> str:
    return (f"Add the line \"{rng.choice(_DOC_LINES)}\" at the end of the docstring of "
            f"`{function}`.")


def _other(rng: random.Random, options: tuple[str, ...], current: str) -> str:
    return rng.choice([option for option in options if option != current])


# ---- fixed blocks --------------------------------------------------------------------------


def _header(t: Theme, rng: random.Random) -> Block:
    limit = rng.choice((16, 32, 64, 100, 128, 500))
    timeout = rng.choice(("0.5", "2.0", "2.5", "10.0", "30.0"))
    imports = ["json", "logging"] + rng.sample(["math", "os", "re", "time"], 2)
    code = (f'"""Helpers for {t.plural}: reading them, checking them and summarising their '
            f'{t.numeric}."""\n\nfrom __future__ import annotations\n\n'
            + "".join(f"import {name}\n" for name in sorted(imports)) +
            "from collections.abc import Iterable, Sequence\n"
            "from dataclasses import dataclass, field\n\n"
            "logger = logging.getLogger(__name__)\n\n"
            f"MAX_{t.upper}S = {limit}\n"
            f"DEFAULT_TIMEOUT = {timeout}\n"
            f'{t.upper}_PREFIX = "{t.noun[:3]}-"')
    new_limit = _other(rng, ("16", "32", "64", "100", "128", "500"), str(limit))
    new_timeout = _other(rng, ("1.0", "5.0", "60.0"), timeout)
    return Block(code, [f"Change the constant `MAX_{t.upper}S` from {limit} to {new_limit}.",
                        f"Change `DEFAULT_TIMEOUT` from {timeout} to {new_timeout}."])


def _dataclass(t: Theme, rng: random.Random) -> Block:
    threshold = rng.choice(("10.0", "50.0", "99.5", "0.25"))
    code = (f"@dataclass\nclass {t.cls}:\n"
            f'    """One {t.noun} as stored: its id, owner and {t.numeric}."""\n\n'
            f"    {t.noun}_id: int\n    owner: str\n    {t.numeric}: float = 0.0\n"
            f'    status: str = "{t.status}"\n'
            f"    tags: list[str] = field(default_factory=list)\n\n"
            f"    def is_large(self, threshold: float = {threshold}) -> bool:\n"
            f'        """Whether this {t.noun}\'s {t.numeric} exceeds threshold."""\n'
            f"        return self.{t.numeric} > threshold")
    new_status = _other(rng, _STATUSES, t.status)
    return Block(code, [f'Change the default `status` of `{t.cls}` from "{t.status}" to '
                        f'"{new_status}".',
                        _change_default("is_large", "threshold", threshold, "75.0"),
                        _add_doc_line("is_large", rng)])


# ---- templates -----------------------------------------------------------------------------


def _total(t: Theme, rng: random.Random) -> Block:
    name, acc = f"total_{t.numeric}", rng.choice(("total", "result"))
    scale = rng.choice(("1.0", "0.5", "2.0", "100.0"))
    code = (f"def {name}({t.plural}: Iterable[{t.cls}], scale: float = {scale}) -> float:\n"
            f'    """Sum of the {t.numeric} of every {t.noun}, times scale."""\n'
            f"    {acc} = 0.0\n"
            f"    for {t.noun} in {t.plural}:\n"
            f"        if {t.noun}.{t.numeric} > 0:\n"
            f"            {acc} += {t.noun}.{t.numeric} * scale\n"
            f"    return {acc}")
    return Block(code, [_rename_local(name, acc), _change_default(name, "scale", scale, "3.0"),
                        _rename_function(name, f"sum_{t.numeric}"), _add_doc_line(name, rng)])


def _group(t: Theme, rng: random.Random) -> Block:
    name = f"group_{t.plural}_by_status"
    code = (f"def {name}({t.plural}: Iterable[{t.cls}]) -> dict[str, list[{t.cls}]]:\n"
            f'    """The {t.plural} keyed by status, each list in input order."""\n'
            f"    groups: dict[str, list[{t.cls}]] = {{}}\n"
            f"    for {t.noun} in {t.plural}:\n"
            f"        groups.setdefault({t.noun}.status, []).append({t.noun})\n"
            f"    return groups")
    return Block(code, [_rename_local(name, "groups"), _add_doc_line(name, rng),
                        _rename_function(name, f"{t.plural}_by_status")])


def _parse(t: Theme, rng: random.Random) -> Block:
    name, sep = f"parse_{t.noun}", rng.choice(("','", "';'", "'|'", "'\\t'"))
    code = (f"def parse_{t.noun}(line: str, sep: str = {sep}) -> {t.cls} | None:\n"
            f'    """A {t.noun} from one line of text, or None when the line is malformed."""\n'
            f"    parts = line.strip().split(sep)\n"
            f"    if len(parts) < 3:\n"
            f'        logger.warning("skipping short line: %r", line)\n'
            f"        return None\n"
            f"    try:\n"
            f"        return {t.cls}(int(parts[0]), parts[1], float(parts[2]))\n"
            f"    except ValueError:\n"
            f'        logger.warning("skipping bad line: %r", line)\n'
            f"        return None")
    return Block(code, [_rename_local(name, "parts"),
                        _change_default(name, "sep", sep, "':'"), _add_doc_line(name, rng)])


def _top(t: Theme, rng: random.Random) -> Block:
    name, limit = f"top_{t.plural}", rng.choice((3, 5, 10, 20))
    code = (f"def {name}({t.plural}: Sequence[{t.cls}], limit: int = {limit}, "
            f"reverse: bool = True) -> list[{t.cls}]:\n"
            f'    """The `limit` {t.plural} with the highest {t.numeric}, best first."""\n'
            f"    ranked = sorted({t.plural}, key=lambda item: item.{t.numeric}, "
            f"reverse=reverse)\n"
            f"    return ranked[:min(limit, MAX_{t.upper}S)]")
    return Block(code, [_rename_local(name, "ranked"),
                        _change_default(name, "limit", str(limit), str(limit + 2)),
                        _change_default(name, "reverse", "True", "False"),
                        _rename_function(name, f"best_{t.plural}")])


def _render(t: Theme, rng: random.Random) -> Block:
    name, width = f"format_{t.noun}", rng.choice((8, 10, 12))
    code = (f"def {name}({t.noun}: {t.cls}, width: int = {width}) -> str:\n"
            f'    """One line for logs and reports: id, owner, {t.numeric} and tags."""\n'
            f'    tags = ", ".join(sorted({t.noun}.tags)) or "-"\n'
            f'    text = f"{{{t.upper}_PREFIX}}{{{t.noun}.{t.noun}_id}} '
            f'{{{t.noun}.owner:<{{width}}}} {{{t.noun}.{t.numeric}:.2f}} [{{tags}}]"\n'
            f"    return text")
    return Block(code, [_rename_local(name, "text"),
                        _change_default(name, "width", str(width), str(width + 6)),
                        _add_doc_line(name, rng)])


def _load(t: Theme, rng: random.Random) -> Block:
    name, key = f"load_{t.plural}", rng.choice(("items", "data", "rows"))
    code = (f"def {name}(path: str, encoding: str = \"utf-8\") -> list[{t.cls}]:\n"
            f'    """The {t.plural} stored as JSON at path; a missing file holds none."""\n'
            f"    try:\n"
            f"        with open(path, encoding=encoding) as handle:\n"
            f"            data = json.load(handle)\n"
            f"    except FileNotFoundError:\n"
            f"        return []\n"
            f'    return [{t.cls}(**item) for item in data["{key}"]]')
    return Block(code, [_rename_local(name, "data"),
                        _change_default(name, "encoding", '"utf-8"', '"latin-1"'),
                        _rename_function(name, f"read_{t.plural}")])


def _validate(t: Theme, rng: random.Random) -> Block:
    name, low = f"check_{t.noun}", rng.choice(("0.0", "1.0", "-1.0"))
    code = (f"def {name}({t.noun}: {t.cls}, minimum: float = {low}) -> list[str]:\n"
            f'    """What is wrong with a {t.noun}, as messages; empty when it is valid."""\n'
            f"    problems = []\n"
            f"    if {t.noun}.{t.noun}_id < 0:\n"
            f'        problems.append(f"negative id {{{t.noun}.{t.noun}_id}}")\n'
            f"    if {t.noun}.{t.numeric} < minimum:\n"
            f'        problems.append(f"{t.numeric} below {{minimum}}")\n'
            f"    if not {t.noun}.owner:\n"
            f'        problems.append("no owner")\n'
            f"    return problems")
    return Block(code, [_rename_local(name, "problems"),
                        _change_default(name, "minimum", low, "0.5"), _add_doc_line(name, rng)])


def _store(t: Theme, rng: random.Random) -> Block:
    capacity = rng.choice((64, 256, 1024))
    code = (f"class {t.cls}Store:\n"
            f'    """{t.cls}s in memory, by id, up to a capacity."""\n\n'
            f"    def __init__(self, capacity: int = {capacity}) -> None:\n"
            f"        self.capacity = capacity\n"
            f"        self._items: dict[int, {t.cls}] = {{}}\n\n"
            f"    def add(self, {t.noun}: {t.cls}) -> None:\n"
            f"        if len(self._items) >= self.capacity:\n"
            f'            raise ValueError("store is full")\n'
            f"        self._items[{t.noun}.{t.noun}_id] = {t.noun}\n\n"
            f"    def get(self, {t.noun}_id: int) -> {t.cls} | None:\n"
            f"        return self._items.get({t.noun}_id)\n\n"
            f"    def __len__(self) -> int:\n"
            f"        return len(self._items)")
    return Block(code, [_change_default(f"{t.cls}Store.__init__", "capacity", str(capacity),
                                        str(capacity * 2)),
                        f"Add a one-line docstring to `{t.cls}Store.get` saying it returns None "
                        "for an unknown id."])


def _dedupe(t: Theme, rng: random.Random) -> Block:
    name = f"unique_{t.plural}"
    code = (f"def {name}({t.plural}: Iterable[{t.cls}]) -> list[{t.cls}]:\n"
            f'    """The {t.plural} without repeated ids; the first of each id is kept."""\n'
            f"    seen: set[int] = set()\n"
            f"    kept = []\n"
            f"    for {t.noun} in {t.plural}:\n"
            f"        if {t.noun}.{t.noun}_id in seen:\n"
            f"            continue\n"
            f"        seen.add({t.noun}.{t.noun}_id)\n"
            f"        kept.append({t.noun})\n"
            f"    return kept")
    return Block(code, [_rename_local(name, "seen"), _rename_local(name, "kept"),
                        _rename_function(name, f"dedupe_{t.plural}"), _add_doc_line(name, rng)])


_TEMPLATES: tuple[Callable[[Theme, random.Random], Block], ...] = (
    _total, _group, _parse, _top, _render, _load, _validate, _store, _dedupe)
