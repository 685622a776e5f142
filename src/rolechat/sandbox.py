"""The Jinja sandbox chat templates render in, bounded in time and size.

Contract: :func:`environment` makes an immutable sandboxed Jinja environment configured like
Hugging Face's ``apply_chat_template`` (``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``),
in which a template cannot run away. Templates render only inside :func:`limits` (one render, one
thread), and a render that breaks one of these bounds raises :class:`TemplateLimit` saying what
the template did, before the work is done:

- no value it makes holds more than ``size`` characters (or items): ``*``, ``+``, ``%``, ``~``,
  ``range()``, string methods and filters are checked before they allocate, and every result
  after;
- integers stay under :data:`MAX_INT_BITS` bits (``*``, ``**``);
- the text it writes — every ``{{ }}`` and literal, also inside macros and ``{% set %}``
  blocks — totals at most ``size`` characters;
- loop iterations, calls, operators and filters together take at most ``steps`` steps, and
  macro calls (and recursive loops) nest at most :data:`MAX_DEPTH` deep;
- it stops after :data:`DEADLINE_S` seconds (a net for what the counts cannot see);
- ``{% include %}``, ``{% import %}``, ``{% from %}`` and ``{% extends %}`` are refused when the
  template compiles: a chat template is one self-contained text;
- Jinja's ``lipsum()`` is gone (it makes text without bound, and no chat template uses it).

Bounds that hold for real templates: every template from the model hubs in tests/data renders
byte for byte as transformers renders it (tests/test_template.py).
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import wraps
from typing import Any

from jinja2 import nodes
from jinja2.ext import loopcontrols
from jinja2.runtime import Context, LoopContext, Macro
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import _PassArg
from jinja2.visitor import NodeTransformer

#: Characters (or items) any render may make, whatever its input ...
SIZE_FLOOR = 1 << 20
#: ... plus this many per character of input (the template, its messages, BOS/EOS text).
SIZE_PER_INPUT = 8
#: Steps (loop iterations, calls, operators, filters) any render may take ...
STEPS_FLOOR = 1_000_000
#: ... plus this many per message.
STEPS_PER_MESSAGE = 1_000
#: How deep macro calls and recursive loops may nest.
MAX_DEPTH = 32
#: The largest integer a template may compute, in bits.
MAX_INT_BITS = 4096
#: The longest a render may run, in seconds.
DEADLINE_S = 30.0

_LOOP, _OUT, _CONCAT = "rolechat_loop", "rolechat_out", "rolechat_concat"


class TemplateLimit(Exception):
    """A template broke a bound. The message says what it did ("repeats a string ...")."""


class _NotRendering(Exception):
    """A guarded operation ran outside :func:`limits` (Jinja folding constants while it
    compiles: the operation then runs at render time instead)."""


@dataclass
class Budget:
    """What one render may still do."""

    size: int
    steps: int
    deadline: float
    taken: int = 0
    written: int = 0
    depth: int = 0

    def step(self) -> None:
        self.taken += 1
        if self.taken > self.steps:
            raise TemplateLimit(f"takes more than {self.steps:,} steps (loop iterations, "
                                "calls and operators; loops inside loops?)")
        if not self.taken % 256 and time.monotonic() > self.deadline:
            raise TemplateLimit(f"ran for more than {DEADLINE_S:g} s")

    def fits(self, n: int, what: str, unit: str = "characters") -> None:
        """Refuse to make ``n`` characters (or items) or more than the limit."""
        if n > self.size:
            amount = f" ({n:,} {unit})" if unit else ""
            raise TemplateLimit(f"{what}{amount}, over this render's limit of {self.size:,}")

    def over(self, n: int, what: str) -> None:
        """Refuse to make about ``n`` characters (an estimate that stops counting early) or
        more than the limit."""
        if n > self.size:
            raise TemplateLimit(f"{what}, more than this render's limit of {self.size:,} "
                                "characters")

    def write(self, n: int) -> None:
        self.written += n
        if self.written > self.size:
            raise TemplateLimit(f"writes more than {self.size:,} characters")


_active = threading.local()


def _budget() -> Budget:
    budget: Budget | None = getattr(_active, "budget", None)
    if budget is None:
        raise _NotRendering
    return budget


@contextmanager
def limits(input_chars: int, messages: int) -> Iterator[Budget]:
    """The bounds of one render on this thread, sized for its input."""
    budget = Budget(size=SIZE_FLOOR + SIZE_PER_INPUT * input_chars,
                    steps=STEPS_FLOOR + STEPS_PER_MESSAGE * messages,
                    deadline=time.monotonic() + DEADLINE_S)
    outer = getattr(_active, "budget", None)
    _active.budget = budget
    try:
        yield budget
    finally:
        _active.budget = outer


# ----- sizes ---------------------------------------------------------------------------------
_SIZED = (str, bytes, list, tuple, dict, set, frozenset, range)


def _length(value: Any) -> int:
    return len(value) if isinstance(value, _SIZED) else 0


def text_size(value: Any, cap: int) -> int:
    """About how many characters ``str(value)`` (or its JSON) has; stops counting past
    ``cap``, so it is cheap on anything too large."""
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, int):
        return value.bit_length() // 3 + 2
    if isinstance(value, dict):
        items: Iterable[Any] = (x for pair in value.items() for x in pair)
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = value
    else:
        return 32
    total = 2
    for item in items:
        total += text_size(item, cap - total) + 2
        if total > cap:
            break
    return total


#: What the messages call each kind of value.
_KIND: dict[type, str] = {str: "string", bytes: "bytes value", list: "list", tuple: "tuple",
                          dict: "mapping", set: "set", frozenset: "set", range: "range"}


def _kind(value: Any) -> str:
    return _KIND.get(type(value), "value")


def _unit(value: Any) -> str:
    return "characters" if isinstance(value, (str, bytes)) else "items"


def _checked(result: Any, budget: Budget) -> Any:
    """``result``, if it is not too large."""
    if isinstance(result, _SIZED) and len(result) > budget.size:
        budget.fits(len(result), f"makes a {_kind(result)}", _unit(result))
    return result


# ----- operators -----------------------------------------------------------------------------
def _repeat(budget: Budget, seq: Any, count: int) -> None:
    unit = _unit(seq)
    each = unit[:-1] if len(seq) == 1 else unit
    budget.fits(len(seq) * max(count, 0),
                f"repeats a {_kind(seq)} of {len(seq):,} {each} {count:,} times", unit)


def _int_bits(bits: int, what: str) -> None:
    if bits > MAX_INT_BITS:
        raise TemplateLimit(f"computes {what}, a number of about {bits:,} bits, over the limit "
                            f"of {MAX_INT_BITS:,}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


#: A printf-style conversion: its width and precision (digits, or * for an argument).
_PRINTF = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?([a-zA-Z%])")
#: A str.format field: the numbers in its format spec.
_FIELD = re.compile(r"\{[^{}]*\}")


def _printf(budget: Budget, fmt: str, args: Any) -> None:
    """``fmt % args``: widths within bounds, and the result's size."""
    values = list(args.values()) if isinstance(args, dict) else (
        list(args) if isinstance(args, tuple) else [args])
    largest = max((text_size(v, budget.size + 1) for v in values), default=0)
    fields = 0
    for match in _PRINTF.finditer(fmt):
        fields += 1
        for number in match.group(1, 2):
            if number == "*":
                raise TemplateLimit("takes a printf width from its arguments (%*d)")
            if number:
                budget.fits(int(number), f"formats a field {int(number):,} characters wide",
                            "")
    budget.over(len(fmt) + fields * largest, "formats a string")


def _format(budget: Budget, fmt: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """``fmt.format(...)``: widths within bounds, and the result's size."""
    largest = max((text_size(v, budget.size + 1) for v in (*args, *kwargs.values())),
                  default=0)
    fields = _FIELD.findall(fmt)
    for field in fields:
        for number in re.findall(r"\d+", field.partition(":")[2]):
            budget.fits(int(number), f"formats a field {int(number):,} characters wide", "")
    budget.over(len(fmt) + len(fields) * largest, "formats a string")


def _binop(budget: Budget, operator: str, left: Any, right: Any) -> None:
    """Refuse ``left <operator> right`` if its result would be too large."""
    if operator == "*":
        if isinstance(left, _SIZED) and _is_int(right):
            _repeat(budget, left, right)
        elif isinstance(right, _SIZED) and _is_int(left):
            _repeat(budget, right, left)
        elif _is_int(left) and _is_int(right):
            _int_bits(left.bit_length() + right.bit_length(), f"{left} * {right}")
    elif operator == "**":
        if _is_int(left) and _is_int(right) and right > 0 and abs(left) > 1:
            _int_bits(math.ceil(math.log2(abs(left)) * right), f"{left} ** {right}")
    elif operator == "+":
        if isinstance(left, _SIZED) and isinstance(right, _SIZED) and (
                len(left) + len(right) > budget.size):
            budget.fits(len(left) + len(right), f"adds two values into a {_kind(left)}",
                        _unit(left))
    elif operator == "%" and isinstance(left, str):
        _printf(budget, left, right)


# ----- string methods ------------------------------------------------------------------------
def _receiver(func: Any) -> Any:
    """The object a bound method (or the sandbox's wrapped ``str.format``) belongs to."""
    return getattr(getattr(func, "__wrapped__", func), "__self__", None)


def _string_method(budget: Budget, text: str, name: str, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Refuse a string method call whose result would be too large; the arguments to call it
    with (a generator given to ``join`` becomes a list)."""
    for value in (*args, *kwargs.values()):
        if _is_int(value):
            budget.fits(value, f"passes {value:,} to str.{name}()", "")
    if name in ("ljust", "rjust", "center", "zfill") and args and _is_int(args[0]):
        budget.fits(args[0], f"pads a string to {args[0]:,} characters", "")
    elif name == "expandtabs":
        size = args[0] if args and _is_int(args[0]) else 8
        budget.fits(len(text) + text.count("\t") * size, "expands tabs")
    elif name == "replace" and len(args) >= 2:
        old, new = args[0], args[1]
        if isinstance(old, str) and isinstance(new, str):
            hits = len(text) + 1 if not old else text.count(old)
            if len(args) > 2 and _is_int(args[2]) and args[2] >= 0:
                hits = min(hits, args[2])
            budget.fits(len(text) + hits * max(0, len(new) - len(old)), "replaces text")
    elif name == "join" and args:
        items = args[0] if isinstance(args[0], (list, tuple)) else list(args[0])
        total = len(text) * max(0, len(items) - 1)
        for item in items:
            total += text_size(item, budget.size + 1)
            if total > budget.size:
                break
        budget.over(total, "joins text")
        return (items, *args[1:])
    elif name in ("format", "format_map"):
        mapping = args[0] if name == "format_map" and args else kwargs
        _format(budget, text, args if name == "format" else (), dict(mapping))
    elif name == "translate" and args and isinstance(args[0], dict):
        largest = max((text_size(v, budget.size + 1) for v in args[0].values()), default=1)
        budget.over(len(text) * max(1, largest), "translates text")
    return args


# ----- filters -------------------------------------------------------------------------------
def _filter_size(budget: Budget, name: str, value: Any, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> None:
    """Refuse a filter whose result would be too large."""
    cap = budget.size + 1
    what = f"uses the {name} filter"
    if name == "center":
        width = args[0] if args else kwargs.get("width", 80)
        if _is_int(width):
            budget.fits(width, what)
    elif name == "indent":
        width = args[0] if args else kwargs.get("width", 4)
        budget.over(text_size(value, cap), what)
        text = str(value)
        per_line = len(width) if isinstance(width, str) else width if _is_int(width) else 0
        budget.fits(len(text) + (text.count("\n") + 1) * per_line, what)
    elif name == "format" and isinstance(value, str):
        _printf(budget, value, kwargs if kwargs else tuple(args))
    elif name == "replace" and len(args) >= 2 and isinstance(value, str):
        _string_method(budget, value, "replace", tuple(str(a) if i < 2 else a
                                                        for i, a in enumerate(args)), {})
    elif name == "join":
        sep = args[0] if args else kwargs.get("d", "")
        items = value if isinstance(value, (list, tuple)) else []
        total = len(str(sep)) * max(0, len(items) - 1)
        for item in items:
            total += text_size(item, cap)
            if total > budget.size:
                break
        budget.over(total, what)
    elif name == "tojson":
        indent = args[0] if args else kwargs.get("indent")
        spaces = (indent if isinstance(indent, int) else len(indent) if isinstance(indent, str)
                  else 0)
        budget.over(text_size(value, cap) * (1 + spaces), what)
    elif name in ("string", "e", "escape", "forceescape", "pprint", "list", "wordwrap"):
        budget.over(text_size(value, cap) * (2 if name == "wordwrap" else 1), what)


def _bounded_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` with its arguments checked before it runs and its result after."""
    skip = 1 if _PassArg.from_obj(func) is not None else 0  # context / environment first

    @wraps(func)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.step()
        value, extra = (args[skip], args[skip + 1:]) if len(args) > skip else (None, ())
        for arg in (*extra, *kwargs.values()):
            if _is_int(arg):
                budget.fits(arg, f"passes {arg:,} to the {name} filter", "")
        if name == "join" and value is not None and not isinstance(value, (list, tuple, str)):
            value = list(value)  # a generator: count what it yields, then join that
            args = (*args[:skip], value, *extra)
        _filter_size(budget, name, value, tuple(extra), kwargs)
        return _checked(func(*args, **kwargs), budget)

    return bounded


def _guard_loop(iterable: Any) -> Iterator[Any]:
    """A loop's items, one step each."""
    budget = _budget()  # now, not when the loop starts: Jinja must not fold this at compile

    def items() -> Iterator[Any]:
        for item in iterable:
            budget.step()
            yield item

    return items()


def _guard_out(value: Any) -> str:
    """What ``{{ value }}`` (or a literal) writes, counted against the render's total."""
    budget = _budget()
    if not isinstance(value, str):
        budget.over(text_size(value, budget.size + 1), "writes a value")  # before str() makes it
    text = str(value)
    budget.write(len(text))
    return text


def _guard_concat(values: list[Any]) -> str:
    """``a ~ b ~ ...``, its size checked before it is made."""
    budget = _budget()
    total = sum(text_size(value, budget.size + 1) for value in values)
    budget.fits(total, "joins values with ~ into a string")
    return "".join(str(value) for value in values)


# ----- the environment -----------------------------------------------------------------------
class _Bound(NodeTransformer):
    """Rewrites a parsed template so that loops, output and ``~`` go through the guards."""

    def _filter(self, node: nodes.Node, name: str) -> nodes.Filter:
        return nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)  # changes node in place
        node.iter = self._filter(node.iter, _LOOP)
        return node

    def visit_Output(self, node: nodes.Output) -> nodes.Node:
        self.generic_visit(node)
        node.nodes = [self._filter(child, _OUT) for child in node.nodes]
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return self._filter(nodes.List(node.nodes, lineno=node.lineno), _CONCAT)

    def _refuse(self, node: nodes.Node) -> nodes.Node:
        tag = {"Include": "include", "Import": "import", "FromImport": "from ... import",
               "Extends": "extends"}[type(node).__name__]
        raise TemplateLimit(f"uses {{% {tag} %}} (line {node.lineno}), but a chat template "
                            "cannot load other templates; put their text in this one")

    visit_Include = visit_Import = visit_FromImport = visit_Extends = _refuse


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, with the bounds of the module's contract."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, *, filters: dict[str, Callable[..., Any]],
                 globals: dict[str, Any], **options: Any) -> None:
        super().__init__(**options)
        self.filters.update(filters)
        self.filters = {name: _bounded_filter(name, func) for name, func in self.filters.items()}
        self.filters.update({_LOOP: _guard_loop, _OUT: _guard_out, _CONCAT: _guard_concat})
        self.globals.update(globals)
        self.globals["range"] = self._range
        self.globals.pop("lipsum", None)

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        _Bound().visit(tree)  # changes tree in place
        tree.set_environment(self)
        return tree

    @staticmethod
    def _range(*args: int) -> range:
        items = range(*args)
        _budget().fits(len(items), f"calls range({', '.join(map(str, args))})", "items")
        return items

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        budget.step()
        _binop(budget, operator, left, right)
        try:
            return _checked(self.binop_table[operator](left, right), budget)
        except OverflowError:
            raise TemplateLimit(f"computes {left!r} {operator} {right!r}, a number too large "
                                "to hold") from None

    def call(__self, __context: Context, __obj: Any, *args: Any,
             **kwargs: Any) -> Any:
        budget = _budget()
        budget.step()
        receiver = _receiver(__obj)
        if isinstance(receiver, str):
            name = getattr(__obj, "__name__", "")
            args = _string_method(budget, receiver, name, args, kwargs)
        nested = isinstance(__obj, (Macro, LoopContext))
        if isinstance(__obj, LoopContext) and args:  # a recursive loop: its items are steps too
            args = (_guard_loop(args[0]), *args[1:])
        if nested:
            budget.depth += 1
            if budget.depth > MAX_DEPTH:
                raise TemplateLimit(f"nests macro calls (or recursive loops) more than "
                                    f"{MAX_DEPTH} deep (a macro that calls itself without end)")
        try:
            return _checked(super().call(__context, __obj, *args, **kwargs), budget)
        finally:
            if nested:
                budget.depth -= 1


def environment(*, filters: dict[str, Callable[..., Any]] | None = None,
                globals: dict[str, Any] | None = None) -> BoundedEnvironment:
    """A bounded sandbox configured like transformers' chat-template environment, with these
    filters (bounded like Jinja's own) and globals added."""
    return BoundedEnvironment(filters=filters or {}, globals=globals or {}, trim_blocks=True,
                              lstrip_blocks=True, extensions=[loopcontrols])
