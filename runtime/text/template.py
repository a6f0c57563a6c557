"""The chat template: untrusted Jinja from the GGUF file, compiled and rendered in jinja2's immutable
sandbox with bounded loops, time and output."""
from __future__ import annotations

import functools
import json
import re
import time
from datetime import datetime

from jinja2 import StrictUndefined, TemplateError, nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from leank.errors import LeankError

# Fallback when a file has no template: ChatML, which llama.cpp also falls back to.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MAX_TEMPLATE_OUTPUT = 16 * 1024 * 1024  # characters a rendered prompt may have


# --- chat template ---------------------------------------------------------------------------------
# The template is untrusted Jinja from the file. jinja2's immutable sandbox keeps it away from Python
# internals; on top of it, every way found to make it run long or allocate much is bounded: access to an
# unsafe attribute fails (instead of rendering as ''), loops share an iteration budget and a deadline,
# `+`, `~`, `*` and every call and filter are refused when they would build more than
# MAX_TEMPLATE_OUTPUT characters, and the output is counted while it streams.
MAX_TEMPLATE_STEPS = 1_000_000  # loop iterations in one rendering (a 1000-turn conversation needs ~10K)
MAX_TEMPLATE_SECONDS = 10.0
_BIG_NUMBER = re.compile(r"\d{8,}")  # a width or precision of 10^7+ characters in a format string


class _Budget:
    """Steps and time left to one rendering."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.steps, self.deadline = MAX_TEMPLATE_STEPS, time.monotonic() + MAX_TEMPLATE_SECONDS

    def tick(self) -> None:
        self.steps -= 1
        if self.steps < 0:
            raise SecurityError(f"more than {MAX_TEMPLATE_STEPS} loop iterations")
        if self.steps % 1024 == 0 and time.monotonic() > self.deadline:
            raise SecurityError(f"rendering took more than {MAX_TEMPLATE_SECONDS:g} s")


def _too_big(value) -> bool:
    return isinstance(value, (str, bytes, list, tuple, dict)) and len(value) > MAX_TEMPLATE_OUTPUT


def _check_args(args, kwargs) -> None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_TEMPLATE_OUTPUT:
            raise SecurityError(f"an argument of {a} is too large")
        if _too_big(a):
            raise SecurityError("an argument is too large")


def _check_format(fmt) -> None:
    if isinstance(fmt, str) and _BIG_NUMBER.search(fmt):
        raise SecurityError("a format string asks for a huge width")


def _estimate_replace(s, old, new) -> int:
    if not isinstance(s, str) or not isinstance(old, str) or not isinstance(new, str):
        return 0
    hits = len(s) + 1 if not old else len(s) // len(old)
    return len(s) + hits * len(new)


def _sandbox(budget: _Budget):
    class _Env(ImmutableSandboxedEnvironment):
        # bound string/list growth so a template cannot allocate gigabytes
        intercepted_binops = frozenset(["*", "**", "+", "%"])

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_TEMPLATE_OUTPUT:
                        raise SecurityError("template output too large")
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 1000:
                raise SecurityError("exponent too large")
            if operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)) \
                    and len(left) + len(right) > MAX_TEMPLATE_OUTPUT:
                raise SecurityError("template output too large")
            if operator == "%" and isinstance(left, str):
                _check_format(left)
                _check_args(right if isinstance(right, tuple) else (right,), {})
            return super().call_binop(context, operator, left, right)

        def wrap_str_format(self, value):
            receiver = getattr(value, "__self__", None)
            if isinstance(receiver, str) and getattr(value, "__name__", "") in ("format", "format_map"):
                _check_format(receiver)
            return super().wrap_str_format(value)

        def unsafe_undefined(self, obj, attribute):
            # the sandbox's default renders as '' and fails only when used further: fail at once instead
            return StrictUndefined(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe",
                                   name=attribute, obj=obj, exc=SecurityError)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja2's own signature
            budget.tick()
            _check_args(args, kwargs)
            receiver = getattr(__obj, "__self__", None)
            if isinstance(receiver, str) and getattr(__obj, "__name__", "") == "replace" \
                    and _estimate_replace(receiver, *args[:2]) > MAX_TEMPLATE_OUTPUT:
                raise SecurityError("template output too large")
            out = super().call(__context, __obj, *args, **kwargs)
            if _too_big(out):
                raise SecurityError("template output too large")
            return out

    env = _Env(trim_blocks=True, lstrip_blocks=True, autoescape=False)

    def guard_filter(name, f):
        @functools.wraps(f)  # keeps jinja's pass_context/pass_environment marks
        def guarded(*args, **kwargs):
            budget.tick()
            _check_args(args, kwargs)
            values = [a for a in args if not hasattr(a, "environment")]  # skip a passed context/environment
            if name == "format" and values:
                _check_format(values[0])
            if name == "replace" and len(values) >= 3 and _estimate_replace(*values[:3]) > MAX_TEMPLATE_OUTPUT:
                raise SecurityError("template output too large")
            if name == "join" and values and isinstance(values[0], (list, tuple)):
                sep = values[1] if len(values) > 1 and isinstance(values[1], str) else ""
                if sum(len(v) if isinstance(v, str) else 1 for v in values[0]) + len(sep) * len(values[0]) > MAX_TEMPLATE_OUTPUT:
                    raise SecurityError("template output too large")
            out = f(*args, **kwargs)
            if _too_big(out):
                raise SecurityError("template output too large")
            return out

        return guarded

    def raise_exception(message):
        raise LeankError(f"chat template refused the conversation: {message}")

    def tojson(value, indent=None):
        return json.dumps(value, ensure_ascii=False, indent=indent)

    def loop_items(iterable):  # every {% for %} iterates through this (see _guard_loops)
        for item in iterable:
            budget.tick()
            yield item

    def concat(values):  # every `~` concatenation goes through this
        parts = [str(v) for v in values]
        if sum(map(len, parts)) > MAX_TEMPLATE_OUTPUT:
            raise SecurityError("template output too large")
        return "".join(parts)

    env.filters["tojson"] = tojson
    env.filters = {name: guard_filter(name, f) for name, f in env.filters.items()}
    env.filters["leank_loop_items"] = loop_items
    env.filters["leank_concat"] = concat
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals.pop("lipsum", None)  # generates text at will; no chat template needs it
    return env


def _guard_loops(ast):
    """Route every loop through the `leank_loop_items` filter and every `~` through `leank_concat`."""
    class Guard(NodeTransformer):
        def visit_For(self, node):
            node = self.generic_visit(node)
            node.iter = nodes.Filter(node.iter, "leank_loop_items", [], [], None, None, lineno=node.lineno)
            return node

        def visit_Concat(self, node):
            node = self.generic_visit(node)
            return nodes.Filter(nodes.List(node.nodes, lineno=node.lineno), "leank_concat", [], [], None, None,
                                lineno=node.lineno)

    return Guard().visit(ast)


class ChatTemplate:
    """The file's `tokenizer.chat_template`, compiled in a sandbox."""

    def __init__(self, source: str | None, bos_token: str, eos_token: str):
        self.is_fallback = not source
        self.source = source or CHATML_TEMPLATE
        self.bos_token, self.eos_token = bos_token, eos_token
        self._budget = _Budget()
        try:
            env = _sandbox(self._budget)
            ast = _guard_loops(env.parse(self.source))
            ast.set_environment(env)
            self._template = env.from_string(ast)
        except TemplateError as e:
            raise LeankError(f"the file's chat template does not compile: {_one_line(e)}") from e
        except (RecursionError, MemoryError) as e:  # absurdly nested source
            raise LeankError(f"the file's chat template does not compile: {type(e).__name__}") from e

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        self._budget.reset()
        pieces, size = [], 0
        try:
            for piece in self._template.generate(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                tools=None,
            ):
                size += len(piece)
                if size > MAX_TEMPLATE_OUTPUT:
                    raise LeankError("the file's chat template produced an oversized prompt")
                pieces.append(piece)
        except LeankError:
            raise
        except SecurityError as e:
            raise LeankError(f"the file's chat template tried something unsafe and was stopped: {_one_line(e)}") from e
        except (TemplateError, TypeError, ValueError, AttributeError, KeyError, IndexError, RecursionError,
                ArithmeticError, MemoryError, UnicodeError, LookupError) as e:
            raise LeankError(f"the file's chat template failed: {type(e).__name__}: {_one_line(e)}") from e
        return "".join(pieces)


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."
