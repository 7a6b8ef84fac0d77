"""AUTOMATIC1111's prompt syntax: emphasis weights, ``BREAK`` and ``<lora:name:weight>`` tags.

:func:`parse_prompt_attention` follows A1111's ``modules/prompt_parser.py`` (its documented
examples are in ``tests/test_prompts.py``):

* ``(text)`` multiplies the weight of ``text`` by 1.1, ``[text]`` divides it by 1.1, and
  ``(text:1.3)`` multiplies it by 1.3; brackets nest (``((text))`` = 1.21);
* ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are the literal characters;
* an unbalanced opening bracket applies to the end of the prompt; an unmatched closing one
  is literal text;
* ``BREAK`` (a word of its own, in capitals) ends the current 75-token chunk
  (:mod:`sd_jax.prompts.chunks`); it comes back as the piece ``("BREAK", -1.0)``;
* neighbouring pieces of equal weight are merged (so ``(a)(b)`` is ``[("ab", 1.1)]``).

:func:`extract_loras` takes the ``<lora:name:weight>`` tags out of a prompt (loading the
LoRAs is the caller's: :mod:`sd_jax.lora`).
"""
from __future__ import annotations

import re

__all__ = ["parse_prompt_attention", "extract_loras", "BREAK"]

BREAK = ("BREAK", -1.0)

# One token of the syntax per match, in A1111's order: escapes, brackets, ":weight)", text, ":".
_ATTENTION = re.compile(r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""", re.X)

_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)

_ROUND = 1.1
_SQUARE = 1 / 1.1

_LORA = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """``text`` -> ``[(piece, weight), ...]`` as A1111's ``parse_prompt_attention``
    (``BREAK`` is the piece ``("BREAK", -1.0)``; an empty prompt is ``[("", 1.0)]``)."""
    res: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for p in range(start, len(res)):
            res[p][1] *= factor

    for m in _ATTENTION.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\"):
            res.append([tok[1:], 1.0])
        elif tok == "(":
            round_open.append(len(res))
        elif tok == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            multiply_from(round_open.pop(), float(weight))
        elif tok == ")" and round_open:
            multiply_from(round_open.pop(), _ROUND)
        elif tok == "]" and square_open:
            multiply_from(square_open.pop(), _SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(tok)):
                if i > 0:
                    res.append(list(BREAK))
                res.append([part, 1.0])
    # Brackets left open apply to the end of the prompt.
    for pos in round_open:
        multiply_from(pos, _ROUND)
    for pos in square_open:
        multiply_from(pos, _SQUARE)
    if not res:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):  # merge runs of equal weight (A1111 merges two BREAKs too)
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return [(t, float(w)) for t, w in res]


def extract_loras(text: str) -> tuple[str, list[tuple[str, float]]]:
    """``("a cat <lora:ink:0.8>", ...)`` -> ``("a cat ", [("ink", 0.8)])``: the prompt without its
    ``<lora:name[:weight]>`` tags (weight 1 when left out), and the tags in order.

    A weight that is not a number is a ValueError naming the tag."""
    loras: list[tuple[str, float]] = []

    def take(m: re.Match) -> str:
        name, weight = m.group(1).strip(), m.group(2)
        try:
            w = 1.0 if weight is None or not weight.strip() else float(weight)
        except ValueError:
            raise ValueError(f"LoRA tag {m.group(0)!r}: the weight {weight!r} is not a number "
                             f"(write <lora:{name}:0.8>)") from None
        loras.append((name, w))
        return ""

    return _LORA.sub(take, text), loras
