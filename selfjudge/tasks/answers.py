"""Answer extraction and scoring: final numbers (maths), choice letters (MMLU), code blocks (HumanEval)."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Callable

_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
# Explicit answer markers, most specific first; each captures the text holding the answer.
_MARKERS = (
    re.compile(r"####\s*([^\n]+)"),
    re.compile(r"\\boxed\{([^{}]*)\}"),
    re.compile(r"answer\s+is\s*[:*\s]*([^\n]*)", re.IGNORECASE),
    re.compile(r"answer\s*:\s*[*\s]*([^\n]*)", re.IGNORECASE),
)


def normalize_number(text: str) -> str | None:
    """Canonical decimal text of a number ('1,000.50' -> '1000.5', '$18.00' -> '18'); None if not a number."""
    s = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    out = format(d.normalize(), "f")
    return "0" if out in ("-0", "0") else out


def extract_number(text: str) -> str | None:
    """The final numeric answer: the last marked one ('####', \\boxed{}, 'answer is', 'Answer:'), else the
    last number in the text. Returned normalised (see ``normalize_number``)."""
    for pat in _MARKERS:
        for hit in reversed(pat.findall(text)):
            nums = _NUM.findall(hit)
            if nums:
                return normalize_number(nums[0])
    nums = _NUM.findall(text)
    return normalize_number(nums[-1]) if nums else None


def score_number(text: str, reference: str) -> float:
    """1.0 when the output's final number equals the reference number, else 0.0."""
    ref = normalize_number(reference)
    if ref is None:
        raise ValueError(f"reference '{reference}' is not a number (dataset.scorer number)")
    return float(extract_number(text) == ref)


_LETTER_PATTERNS = (
    re.compile(r"(?i:answer)(?:\s+is)?[\s:*]*(?:(?i:option|choice)\s*)?\(?([ABCD])\b"),
    re.compile(r"\(([ABCD])\)"),
    re.compile(r"^[\s*]*\(?([ABCD])(?:[.):*]|\s*$)", re.MULTILINE),
)


def extract_letter(text: str) -> str | None:
    """The chosen letter A-D: 'Answer: C', 'the answer is (B)', '(C)', a line 'D.' or a lone 'B'.
    With no marker, a letter counts only when it is the single distinct stand-alone capital A-D."""
    for pat in _LETTER_PATTERNS:
        m = pat.search(text)
        if m:
            return m.group(1)
    lone = set(re.findall(r"\b([ABCD])\b", text))
    return lone.pop() if len(lone) == 1 else None


def score_letter(text: str, reference: str) -> float:
    """1.0 when the chosen letter equals the reference letter, else 0.0."""
    return float(extract_letter(text) == reference.strip().upper())


def score_exact(text: str, reference: str) -> float:
    """1.0 when the stripped output equals the stripped reference."""
    return float(text.strip() == reference.strip())


SCORERS: dict[str, Callable[[str, str], float]] = {"number": score_number, "letter": score_letter, "exact": score_exact}

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
_MAIN = re.compile(r"^if\s+__name__\s*==.*", re.DOTALL | re.MULTILINE)


def extract_code(text: str, entry_point: str | None = None) -> str:
    """The code of a completion: the fenced block that defines ``entry_point`` (else the longest block;
    an unclosed fence runs to the end), or the raw text without fences. A trailing
    ``if __name__ == ...`` block is dropped (the tests must not run the model's own demo)."""
    blocks = _FENCE.findall(text)
    if blocks:
        defining = [b for b in blocks if entry_point and re.search(rf"^def\s+{re.escape(entry_point)}\s*\(", b, re.M)]
        code = (defining or sorted(blocks, key=len, reverse=True))[0]
    else:
        code = text
    return _MAIN.sub("", code)


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The program that checks a HumanEval completion. A completion that repeats ``def entry_point(``
    is appended after the whole prompt (the prompt keeps its imports and helpers; the new definition
    wins); otherwise it is the body that continues the prompt."""
    code = extract_code(completion, entry_point)
    if re.search(rf"^def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
        body = f"{prompt}\n{code}"
    else:
        body = prompt + code
    return f"{body}\n\n{test}\n\ncheck({entry_point})\n"
