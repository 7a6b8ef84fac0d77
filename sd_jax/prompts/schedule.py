"""A1111 prompt editing ``[from:to:when]`` and alternation ``[a|b]``: which text at which step.

Follows A1111's ``get_learned_conditioning_prompt_schedules`` (``modules/prompt_parser.py``,
whose lark grammar this parses by hand):

* ``[from:to:when]`` is ``from`` up to step ``when`` and ``to`` after it; ``[to:when]`` adds
  ``to`` after ``when``, ``[from::when]`` removes ``from`` after it.  ``when`` with a ``.`` is
  a fraction of the steps (``0.25`` of 20 = 5), else a step number; it is capped at the steps;
* ``[a|b|c]`` cycles through its options, one a step;
* ``(...)`` and ``[...]`` (emphasis) pass through as text, for the emphasis parser;
* a prompt the grammar does not accept is used as it is, at every step.

:func:`prompt_schedule` gives A1111's list ``[(end_step, text), ...]``; :func:`step_texts` the
text of each sampler step: at step ``i`` (0-based) the first entry whose ``end_step >= i``,
as A1111's ``reconstruct_cond_batch`` picks it (so ``[a:b:10]`` is ``a`` for the first 11 steps).
"""
from __future__ import annotations

import re

__all__ = ["prompt_schedule", "step_texts"]

_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+", re.S)
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_WS = re.compile(r"\s+")


class _Fail(Exception):
    pass


class _Parser:
    """Recursive descent over A1111's grammar; nodes: str, ("emph", [...]),
    ("sched", before|None, after, number text), ("alt", [options])."""

    def __init__(self, text: str):
        self.s, self.i = text, 0

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def prompt(self) -> list:
        out = []
        while self.i < len(self.s):
            c = self.s[self.i]
            if c in "])|:":
                break
            if c in "[(":
                out.append(self.bracket())
                continue
            m = _PLAIN.match(self.s, self.i)
            if not m:     # a lone backslash at the end
                raise _Fail
            out.append(m.group(0))
            self.i = m.end()
        return out

    def expect(self, c: str) -> None:
        if self.peek() != c:
            raise _Fail
        self.i += 1

    def number(self) -> str | None:
        start = self.i
        ws = _WS.match(self.s, self.i)
        if ws:
            self.i = ws.end()
        m = _NUMBER.match(self.s, self.i)
        if m:
            self.i = m.end()
            ws = _WS.match(self.s, self.i)
            if ws:
                self.i = ws.end()
            if self.peek() == "]":
                self.i += 1
                return m.group(0)
        self.i = start
        return None

    def bracket(self):
        if self.peek() == "(":
            self.i += 1
            first = self.prompt()
            if self.peek() == ":":
                self.i += 1
                second = self.prompt()
                self.expect(")")
                return ("emph", ["("] + first + [":"] + second + [")"])
            self.expect(")")
            return ("emph", ["("] + first + [")"])
        self.expect("[")
        first = self.prompt()
        c = self.peek()
        if c == "]":
            self.i += 1
            return ("emph", ["["] + first + ["]"])
        if c == "|":
            options = [first]
            while self.peek() == "|":
                self.i += 1
                options.append(self.prompt())
            self.expect("]")
            return ("alt", options)
        self.expect(":")
        n = self.number()
        if n is not None:             # [to:when]
            return ("sched", None, first, n)
        second = self.prompt()
        self.expect(":")
        n = self.number()
        if n is None:
            raise _Fail
        return ("sched", first, second, n)

    def start(self) -> list:
        out = []
        while self.i < len(self.s):
            c = self.s[self.i]
            if c in "[(":
                save = self.i
                try:
                    out.append(self.bracket())
                    continue
                except _Fail:
                    self.i = save + 1
                    out.append(c)   # A1111's grammar takes a stray bracket as text at the top level
                    continue
            if c in "]):":
                out.append(c)
                self.i += 1
                continue
            if c == "|":
                raise _Fail
            out.extend(self.prompt())
        return out


def _when(n: str, steps: int) -> int:
    v = float(n) * steps if "." in n else float(n)
    return min(steps, int(v))


def _collect(nodes, steps: int, res: set) -> None:
    for n in nodes:
        if isinstance(n, str):
            continue
        if n[0] == "emph":
            _collect(n[1], steps, res)
        elif n[0] == "alt":
            res.update(range(1, steps + 1))
            for o in n[1]:
                _collect(o, steps, res)
        else:
            w = _when(n[3], steps)
            if w >= 1:
                res.add(w)
            _collect(n[1] or [], steps, res)
            _collect(n[2], steps, res)


def _at(nodes, step: int, steps: int) -> str:
    out = []
    for n in nodes:
        if isinstance(n, str):
            out.append(n)
        elif n[0] == "emph":
            out.append(_at(n[1], step, steps))
        elif n[0] == "alt":
            out.append(_at(n[1][(step - 1) % len(n[1])], step, steps))
        else:
            out.append(_at(n[1] or [], step, steps) if step <= _when(n[3], steps) else _at(n[2], step, steps))
    return "".join(out)


def prompt_schedule(text: str, steps: int) -> list[tuple[int, str]]:
    """A1111's schedule of ``text`` over ``steps`` steps: ``[(end_step, text), ...]``."""
    try:
        tree = _Parser(text).start()
    except _Fail:
        return [(steps, text)]
    res = {steps}
    _collect(tree, steps, res)
    return [(t, _at(tree, t, steps)) for t in sorted(res)]


def step_texts(text: str, steps: int, num_steps: int | None = None) -> list[str]:
    """The text used at each sampler step ``0 .. num_steps - 1`` (default ``steps``)."""
    sched = prompt_schedule(text, steps)
    out = []
    for i in range(steps if num_steps is None else num_steps):
        out.append(next((t for end, t in sched if end >= i), sched[-1][1]))
    return out
