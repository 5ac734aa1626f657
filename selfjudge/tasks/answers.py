"""Answer extraction and scoring: final numbers (maths), choice letters (MMLU), code blocks (HumanEval)."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
# Explicit answer markers, most specific first; each captures the text holding the answer (\boxed{} is
# matched with balanced braces, below).
_MARKERS = (
    re.compile(r"####\s*([^\n]+)"),
    "boxed",
    re.compile(r"answer\s+is\s*[:*\s]*([^\n]*)", re.IGNORECASE),
    re.compile(r"answer\s*:\s*[*\s]*([^\n]*)", re.IGNORECASE),
)
_SENTENCE_END = re.compile(r"\.(?=\s|$)|;|,\s|\s(?:so|and|because|since|which)\s", re.IGNORECASE)
_PLAIN = re.compile(r"^(?:\\?\$)?\s*(-?(?:\d[\d,]*(?:\.\d+)?|\.\d+))\s*(?:%|[A-Za-z][A-Za-z .]*)?$")
_LATEXISH = re.compile(r"[\\{}^/]")


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


def _boxed(text: str) -> list[str]:
    """Contents of every \\boxed{...} / \\fbox{...}, braces balanced ('\\boxed{\\frac{1}{2}}' -> '\\frac{1}{2}')."""
    out = []
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append(text[m.end() : i - 1])
    return out


def _final_part(span: str) -> str:
    """The answer inside a marked span: up to the end of its first sentence, the right side of its last '='
    ('5 + 3 = 8' -> '8'), without markdown emphasis, '$' delimiters kept."""
    span = span.replace("**", "").strip()
    if not span.startswith("$") or span.count("$") < 2:
        cut = _SENTENCE_END.search(span)
        span = span[: cut.start()] if cut else span
    else:
        span = span[: span.index("$", 1) + 1]  # '$3/4$ of them' -> '$3/4$'
    if "=" in span:
        inner = span.strip("$").rsplit("=", 1)[1].strip()
        span = f"${inner}$" if span.startswith("$") else inner
    return span.strip().rstrip(".:;,!").strip()


def extract_answer(text: str) -> str | None:
    """The final answer text: the last marked one ('####', \\boxed{}, 'answer is', 'Answer:') reduced to its
    final part (see ``_final_part``), else the last number in the text; None when there is none."""
    for pat in _MARKERS:
        hits = _boxed(text) if pat == "boxed" else pat.findall(text)
        for hit in reversed(hits):
            ans = _final_part(hit) if pat != "boxed" else hit.strip()
            if ans and re.search(r"\d", ans):
                return ans
    nums = _NUM.findall(text)
    return nums[-1] if nums else None


def _plain(ans: str) -> str | None:
    """A plain number, possibly with a currency sign or trailing unit words ('$18.00', '20 apples', '5%')."""
    m = _PLAIN.match(ans.strip().strip("$").strip() if ans.count("$") >= 2 else ans.strip())
    return normalize_number(m.group(1)) if m else None


def _math(text: str):
    """math-verify's parse of an answer as LaTeX (a list of sympy forms; [] when it has none)."""
    from math_verify import parse

    body = text.strip()
    body = body[1:-1] if body.startswith("$") and body.endswith("$") and len(body) > 1 else body
    return parse("\\boxed{" + body + "}", parsing_timeout=_timeout())


def _timeout() -> int | None:
    return 5 if threading.current_thread() is threading.main_thread() else None  # signal alarms: main only


def _closed(forms) -> bool:
    """A parse that is a value: a number or a constant expression, no free symbols ('n/a' parses as n/a)."""
    return bool(forms) and not isinstance(forms[0], str) and not getattr(forms[0], "free_symbols", {None})


def answers_match(answer: str, reference: str) -> bool:
    """Whether an extracted answer equals the reference: plain numbers compare exactly as decimals; LaTeX,
    fractions and expressions ('\\frac{1}{2}', '1{,}000', '3/4') by math-verify's numeric and symbolic
    equivalence; text math-verify cannot read as a value falls back to its first number."""
    a, r = _plain(answer), _plain(reference)
    if a is not None and r is not None:
        return a == r
    from math_verify import verify

    ga, gr = _math(answer), _math(reference) if r is None else _math(r)
    if _closed(ga) and _closed(gr):
        return bool(verify(gr, ga, timeout_seconds=_timeout()))
    nums = _NUM.findall(answer)
    return r is not None and bool(nums) and normalize_number(nums[0]) == r


def score_number(text: str, reference: str) -> float:
    """1.0 when the output's final answer equals the reference (a number, or a LaTeX value), else 0.0."""
    if _plain(reference) is None and not _closed(_math(reference)):
        raise ValueError(f"reference '{reference}' is not a number (dataset.scorer number)")
    ans = extract_answer(text)
    return float(ans is not None and answers_match(ans, reference))


# Explicit answer markers for a choice letter; the last one in the text is the answer (a model may
# reconsider, and a response that walks through the options names every letter before it concludes).
_LETTER_MARKERS = (
    re.compile(r"(?i:answer)(?:\s+is)?[\s:*]*(?:(?i:option|choice)\s*)?[(\[]?\**([ABCD])\b"),
    re.compile(r"(?i:correct|right|best|most\s+\w+)\s+[a-z]+\s+(?:is|would\s+be)[\s:*]*[(\[]?\**([ABCD])\b"),
    re.compile(r"\\(?:boxed|fbox)\s*\{\s*(?:\\text(?:bf)?\s*\{\s*)?\(?([ABCD])\b"),
)
# Without a marker: a line that is only a letter ('B', '(C).', '**D**'), the last one
_LETTER_LINE = re.compile(r"^[\s*]*\(?([ABCD])\)?[.):]?[\s*]*$", re.MULTILINE)
# ... else letters that point at one option, counted only when they all name the same one: '(C)', a line
# opening with 'D.' (a walk through the options opens lines with every letter: no answer) or a lone capital
_LETTER_WEAK = (
    re.compile(r"\(([ABCD])\)"),
    re.compile(r"^[\s*]*\(?([ABCD])[.):*]", re.MULTILINE),
    re.compile(r"\b([ABCD])\b"),
)


def extract_letter(text: str) -> str | None:
    """The chosen letter A-D: the last explicit marker ('Answer: C', 'the answer is (B)', 'the correct
    option is D', '\\boxed{A}'), else the last line that is only a letter, else the one option that
    '(C)', a line opening with 'D.' or a stand-alone capital names when they all name the same one."""
    hits = [(m.start(), m.group(1)) for pat in _LETTER_MARKERS for m in pat.finditer(text)]
    if hits:
        return max(hits)[1]
    lines = _LETTER_LINE.findall(text)
    if lines:
        return lines[-1]
    for pat in _LETTER_WEAK:
        found = set(pat.findall(text))
        if found:
            return found.pop() if len(found) == 1 else None
    return None


def score_letter(text: str, reference: str) -> float:
    """1.0 when the chosen letter equals the reference letter, else 0.0."""
    return float(extract_letter(text) == reference.strip().upper())


def score_exact(text: str, reference: str) -> float:
    """1.0 when the stripped output equals the stripped reference."""
    return float(text.strip() == reference.strip())


SCORERS: dict[str, Callable[[str, str], float]] = {"number": score_number, "letter": score_letter, "exact": score_exact}
# Revisions of a checker that score some outputs differently from its first version (bump on such a change).
# Outputs that hold scores name the revision that made them (eval records are re-scored from their texts,
# AutoJudge labels are made again), so that scores of two revisions are never mixed. First versions: absent.
CHECKER_REVISIONS = {"letter": 2}  # letter 2: the last explicit marker wins (1 took the first line 'A. ...')


def checker_revision(kind: str) -> str | None:
    """'<scorer>@<revision>' for a checker revised since its first version, else None."""
    rev = CHECKER_REVISIONS.get(kind)
    return f"{kind}@{rev}" if rev else None


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
