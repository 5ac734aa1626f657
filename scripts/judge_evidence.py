"""The issue-12 end-to-end evidence in one resumable command: three judges, validation sweeps, thresholds, evals.

    python scripts/judge_evidence.py                                    # real offline pair on the CPU (hours)
    python scripts/judge_evidence.py --device cuda                      # the same on a GPU (minutes)
    python scripts/judge_evidence.py --gsm8k-dir data/gsm8k             # a local GSM8K copy (train/test.jsonl)
    python scripts/judge_evidence.py --tiny                             # tiny random pair: the chain in seconds
    python scripts/judge_evidence.py --dry-run                          # print the commands, run nothing
    python scripts/judge_evidence.py --rules-only --only val_gsm8k      # one step, without the judges
    python scripts/judge_evidence.py --judges judge_gsm8k --only val_gsm8k  # one judge's rows (the others later)
    python scripts/judge_evidence.py --status                           # what is done: steps, records per method
    python scripts/judge_evidence.py --judges judge_gsm8k --guard 0.9   # each judge also with the KL rule's top-1 guard
    python scripts/judge_evidence.py -- model.dtype=bfloat16            # hydra overrides for every stage
    python scripts/judge_evidence.py -- pipeline.nproc_per_node=8       # data and eval steps as 8 ranks (GPUs, cores)

It only composes the existing commands (``selfjudge-pipeline`` per step, ``scripts/pick_thresholds.py``):

1. judges (data_gen + train, one run folder each under the run root): ``judge_gsm8k`` on GSM8K train problems
   (brief-reasoning prompt, fixed τ), ``autojudge_gsm8k`` on the same problems with ``train.label_source=autojudge``
   (its data_gen also labels up to ``--autojudge-mismatches`` mismatches per response AutoJudge-style,
   independent, spread: one greedy continuation each, most of the judges' cost, so it has its own data folder and
   the SelfJudge head never waits for it), and ``judge_mix`` on ``default_mix`` (GSM-Symbolic + HumanEval train
   part + ShareGPT; no MMLU), all with the feature layout of ``--features`` and the head of ``--head``;
2. validation sweeps at γ, batched, on slices no eval reports (GSM8K train problems from 1024, MMLU questions
   from 2048 of the seed-0 shuffle): lossless, kl, likelihood, typical and the three judges at their stored
   ``head_quantiles``;
3. ``scripts/pick_thresholds.py`` on each sweep: per rule the thresholds that bracket lossless accuracy;
4. the evals on GSM8K test problems 0..N-1 (``gsm8k_test_brief``) and MMLU questions 0..N-1 at those
   thresholds (a rule with nothing picked is left out, and said so);
5. ``study_mmlu`` (data only, no head): MMLU questions from 1280 of the shuffle (``--study-prompts``, brief
   reasoning) in autojudge_gsm8k's feature layout with its AutoJudge labels, the general-knowledge half of the
   signal study (``scripts/bench_signals.py --data gsm8k=<autojudge_gsm8k data> mmlu=<study_mmlu data>``).

Steps: ``--only`` runs the named steps (judge_gsm8k, autojudge_gsm8k, judge_mix, val_gsm8k, val_mmlu,
eval_gsm8k, eval_mmlu, study_mmlu), so that two processes can share the work (one task each: a step's run folder is
locked to one writer); an eval step needs its validation sweep finished. ``--rules-only`` leaves the judges
out (no training, no judge rows): lossless and the training-free rules, which need no judge; ``--judges`` names
the judges that train and join the sweeps and evals (default the three above; ``autojudge_carry``, by name
only, is autojudge_gsm8k labelled by AutoJudge's whole search, ``data_gen.autojudge.mode=carry``, which also labels
the swaps a decode makes off the target's path), so a judge whose data is done can be
swept while another's data is still being made. A later run with more judges reuses every record made so far
(the pipeline hands a redone eval its records back).

Resuming: a rerun skips every step whose output is finished (the pipeline's stage markers) and the stages
resume their partial work. Every two minutes while an eval runs, and after it (also when stopped by Ctrl-C or
SIGTERM), its records go to
``<bench-dir>/<name>.per_example.jsonl.gz`` (deterministic gzip, rewritten only when they changed) with
``<name>.eval_key.json`` beside it: commit both. At the start of a run, an eval folder without records gets
them back from there, so that eval resumes instead of starting over, on this machine or another. The same
holds for autojudge_gsm8k's and study_mmlu's AutoJudge labels, their costly part (``<bench-dir>/evidence_<step>.autojudge_labels.jsonl.gz``,
written as its shards land, merged with the labels already there, passed back as ``data_gen.autojudge_labels_from``):
a machine without its data folder takes the labels, and decodes the batches still to label first, so that a
stopped run has added to the file. Labels are taken where the response is the same token for token, and a bf16
greedy response may differ on another CPU or GPU (a third of them did between two CPU kinds): so the responses
they were made for are committed beside them (``evidence_<step>.responses.jsonl.gz``, passed back as
``data_gen.responses_from``) and teacher-forced instead of generated; only the prompts not in it are generated
(with the ``data_gen.batch_size`` and dtype that made the labels, so that on the same machine kind they match).
The rank count is free (ranks take whole batches of the one-rank cut). ``--labelled-only`` builds
autojudge_gsm8k's data from just the prompts of that responses file (``data_gen.dataset.ids``; every one
teacher-forced, no label made) in its own run root, so a head trains on the labels made so far; its records
join the same committed files (the records key holds each head's content hash).

Paths: every command runs in the repository root, so relative paths (run root, ``--gsm8k-dir``) are relative
to it. Use relative paths: the records key hashes the dataset settings *including the path string*, so
records resume only under the same string (``data/gsm8k`` on every machine, never ``/home/a/...``). The key
also covers γ, max new tokens, batch size, seed, the model fingerprints, the dtype and (where not torch's
default) the CPU kernel choice: pin ``model.dtype`` / ``model.cpu_kernels`` after ``--`` to share records
between machines that would resolve them differently. Judge heads are not committed: a machine that trains
them again gets other heads, and the judge rows of the sweeps and evals are decoded again (records are kept
per head content); the rules' rows are kept.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import shlex
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECORDS, KEY_FILE = "per_example.jsonl", "eval_key.json"  # selfjudge.evaluation.RECORDS / KEY_FILE
RANK_RECORDS = "per_example.rank*.jsonl"  # each rank's records while several decode (selfjudge.evaluation.RecordsFile)
BRIEF_MATHS = "Solve the problem step by step, briefly. End with: The answer is <number>."
BRIEF_MMLU = "Think step by step, briefly. End with: The answer is <letter>."
FEATURES = (
    "'data_gen.features.state_offsets=[-1,0]' 'data_gen.features.scalars=[target_logp,target_top1_logp,target_gap]'"
)
# autojudge_gsm8k's folder stores a superset (selfjudge.features.SCALARS, the draft's state), so that with its
# answer-change labels it is also GSM8K signal-study data (scripts/bench_signals.py); its head reads --features
STUDY_FEATURES = (
    "'data_gen.features.layers=[-1]' 'data_gen.features.state_offsets=[-1,0]' 'data_gen.features.include_draft=true' "
    "'data_gen.features.scalars=[target_logp,target_top1_logp,target_gap,target_entropy,target_log_rank,draft_logp,kl]'"
)
# validation grids: on 64 GSM8K test problems at γ=8 kl@1 and likelihood@1 were still at or above lossless
# accuracy (docs/benchmarks.md), so the grids reach past them; on the GSM8K validation slice kl@0.5 was already
# 4.7 points below lossless and no KL cut was picked, so kl also reaches down to 0.25
GRIDS = {"kl": "0.25,0.5,1,2,4", "likelihood": "1,2,3", "typical": "0.03,0.1,0.3"}
# the MMLU slices' grids: on the MMLU validation slice (scored by the revised letter checker) likelihood@1 and
# typical@0.3 were already 3-6 points below lossless and nothing of theirs within 2 points, so they reach stricter
GRIDS_MMLU = {**GRIDS, "likelihood": "0.5,1,2,3", "typical": "0.03,0.1,0.3,1"}
# the judges' sweep: the cuts at these quantiles of P(important) on their validation mismatches (train.quantiles),
# i.e. accepting about 5-40 % of the mismatches; on 64 GSM8K test problems the 512-problem MLP head was at the
# target's accuracy near its 20 % quantile and 6 points below at 40 % (docs/benchmarks.md); the train default
# (eleven levels) would make each judge's rows cost some 4 h per slice on a CPU
JUDGE_QUANTILES = "0.05,0.1,0.2,0.3,0.4"
# the answer-labelled head's sweep reaches further: its label is rare (8 % of GSM8K mismatches change the answer)
# and, on 1,221 labels of its own folder cross-fitted, accepting the 50 % (75 %) of mismatches it finds safest let
# through 2.8 % (4.0 %) that change the answer, where every rule let through 7-9 % at any share (bench_signals)
AUTOJUDGE_QUANTILES = "0.2,0.35,0.5,0.65,0.8"
# real pair / --tiny: sizes, and where the validation slices start (disjoint from the judges' and evals' prompts)
SIZES = {
    "real": dict(judge_prompts=512, val_prompts=64, eval_prompts=256, gamma=8, batch_size=64, gen_batch_size=32,
                 max_new_tokens=512, tau="1.0901", mix="default_mix", run_root="runs/judge_evidence",
                 bench_dir="docs/bench", gsm8k_val_offset=1024, autojudge_mismatches=8, study_prompts=256),
    "tiny": dict(judge_prompts=16, val_prompts=4, eval_prompts=4, gamma=4, batch_size=4, gen_batch_size=4,
                 max_new_tokens=24, tau="quantile", mix="quick_mix", run_root="runs/judge_evidence_tiny",
                 bench_dir=None, gsm8k_val_offset=32, autojudge_mismatches=8, study_prompts=4),
}  # fmt: skip
MMLU_VAL_OFFSET = 2048
# study_mmlu's questions: after the earlier MMLU signal-study chunks (1024-1127 of the same shuffle), before the
# validation slice; the evals take 0..N-1
MMLU_STUDY_OFFSET = 1280
GUARD_SUFFIX = "_top1"  # --guard: the judge method with the top-1 guard
DEFAULT_JUDGES = ("judge_gsm8k", "autojudge_gsm8k", "judge_mix")
# autojudge_carry (by --judges only): autojudge_gsm8k's problems, layout and responses, labelled by AutoJudge's whole
# search (data_gen.autojudge.mode=carry), which also labels swaps off the target's path
JUDGES = (*DEFAULT_JUDGES, "autojudge_carry")
STUDIES = ("study_mmlu",)  # data only (no head): signal-study data with AutoJudge labels for scripts/bench_signals.py
STEPS = (*JUDGES, "val_gsm8k", "val_mmlu", "eval_gsm8k", "eval_mmlu", *STUDIES)


def q(s: str) -> str:
    """A hydra string value in quotes (system prompts, paths)."""
    if '"' in s or "\\" in s:
        raise SystemExit(f"judge_evidence: {s!r} holds a double quote or a backslash; use a path without them")
    return f'"{s}"'


def toy_gsm8k(folder: Path) -> Path:
    """--tiny without --gsm8k-dir: a small GSM8K-format folder (train.jsonl, test.jsonl). Answers are 0, 2 or 5:
    the random tiny pair writes such digits often enough that AutoJudge labels (answer changed by a swap) get
    both classes, which its head needs (GSM-Symbolic or MMLU give it none)."""
    rng = random.Random(0)
    for split, n in (("train", 48), ("test", 16)):
        rows = []
        for _ in range(n):
            k = rng.choice([0, 2, 5])
            a, who, what = k + rng.randint(1, 30), rng.choice(["Tom", "Ann", "Kim"]), rng.choice(["pens", "eggs"])
            text = f"{who} has {a} {what} and gives away {a - k}. How many {what} are left?"
            rows.append(json.dumps({"question": text, "answer": f"{a} - {a - k} = {k}\n#### {k}"}) + "\n")
        path = folder / f"{split}.jsonl"
        if not path.is_file() or path.read_text() != "".join(rows):
            folder.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(rows))
    return folder


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="experiment=tiny, tiny sizes, toy GSM8K data (tests)")
    ap.add_argument("--device", default="cpu", help="model.device: cpu | cuda | cuda:N (default cpu)")
    ap.add_argument("--model", default="qwen_coder_offline", help="model config (conf/model/); --tiny: tiny")
    ap.add_argument("--gsm8k-dir", default=None, help="folder with train.jsonl and test.jsonl, repo-relative "
                    "(default: the hub, openai/gsm8k; --tiny: a toy folder under the run root)")  # fmt: skip
    ap.add_argument("--run-root", default=None, help="run folders go here (default runs/judge_evidence[_tiny])")
    ap.add_argument("--bench-dir", default=None, help="compressed records (default docs/bench; --tiny: <root>/bench)")
    for name, what in (
        ("judge-prompts", "training prompts per judge (512)"),
        ("val-prompts", "validation problems per task (64)"),
        ("eval-prompts", "eval problems per task, N (256)"),
        ("gamma", "draft window γ (8)"),
        ("batch-size", "eval.batch_size (64)"),
        ("gen-batch-size", "data_gen.batch_size (32)"),
        ("max-new-tokens", "new tokens per response, data_gen and eval (512)"),
        ("autojudge-mismatches", "AutoJudge-labelled mismatches per response, autojudge_gsm8k and study_mmlu (8)"),
        ("study-prompts", f"MMLU questions of study_mmlu, from {MMLU_STUDY_OFFSET} of the shuffle (256)"),
    ):
        ap.add_argument(f"--{name}", type=int, default=None, help=what)
    ap.add_argument("--tau", default=None, help="data_gen τ: a number, or 'quantile' (default 1.0901; --tiny quantile)")
    ap.add_argument("--head", default="mlp", help="judge head of the three judges, conf/judge/ (default mlp: the "
                    "best on the SelfJudge label in the signal study, docs/benchmarks.md)")  # fmt: skip
    ap.add_argument("--judge-quantiles", default=JUDGE_QUANTILES, help="quantile levels of P(important) the "
                    f"SelfJudge heads store and the sweeps decode (train.quantiles; default {JUDGE_QUANTILES})")  # fmt: skip
    ap.add_argument("--autojudge-quantiles", default=AUTOJUDGE_QUANTILES, help="the same for autojudge_gsm8k's "
                    f"answer-labelled head (default {AUTOJUDGE_QUANTILES})")  # fmt: skip
    ap.add_argument(
        "--features", default=FEATURES, help=f"the judges' features: data_gen.features overrides (default {FEATURES})"
    )
    ap.add_argument("--autojudge-features", default=STUDY_FEATURES, help="data_gen.features overrides of "
                    "autojudge_gsm8k's data: a superset of --features (its head trains on those, train.features), "
                    "so that the folder serves the signal study too (default: the seven scalars and the draft state)")  # fmt: skip
    for rule, grid in GRIDS.items():
        ap.add_argument(f"--{rule}", default=None, help=f"{rule} thresholds of both validation sweeps (default "
                        f"GSM8K {grid}, MMLU {GRIDS_MMLU[rule]})")  # fmt: skip
    ap.add_argument("--guard", type=float, default=None, metavar="P", help="also sweep and evaluate each judge "
                    f"with the KL rule's guard, strict where the target's top-1 probability exceeds P, as <judge>{GUARD_SUFFIX} "
                    "(eval policy option judge_strict_top1; 0.9 is the KL rule's)")  # fmt: skip
    ap.add_argument("--max-loss", type=float, default=0.02, help="pick_thresholds --max-loss (0.02: 2 points)")
    ap.add_argument("--only", default=None, help=f"comma-separated steps to run (default all: {', '.join(STEPS)})")
    ap.add_argument("--rules-only", action="store_true", help="no judges: lossless and the training-free rules")
    ap.add_argument(
        "--judges",
        help=f"comma-separated judges that train and join the sweeps and evals, of {', '.join(JUDGES)} "
        f"(default: {', '.join(DEFAULT_JUDGES)})",
    )
    ap.add_argument(
        "--labelled-only",
        action="store_true",
        help="the AutoJudge-labelled judge's data only for the prompts of its committed responses file "
        "(<bench-dir>/evidence_autojudge_gsm8k.responses.jsonl.gz, data_gen.dataset.ids): a head from the labels "
        "made so far, before all its prompts are; its run root defaults to <run root>_labelled",
    )
    ap.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    ap.add_argument("--status", action="store_true", help="print what each step has done (here or committed) and stop")
    ap.add_argument("overrides", nargs="*", help="hydra overrides appended to every stage command (after --)")
    args = ap.parse_args(argv)
    for k, v in SIZES["tiny" if args.tiny else "real"].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.bench_dir is None:
        args.bench_dir = f"{args.run_root}/bench"
    if args.labelled_only and args.run_root == SIZES["tiny" if args.tiny else "real"]["run_root"]:
        args.run_root += "_labelled"  # its data folder (another prompt set) and head stay apart from the full run's
    for k in [k for k, v in SIZES["real"].items() if isinstance(v, int)]:
        if getattr(args, k) < 1:
            raise SystemExit(f"judge_evidence: --{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    args.only = STEPS if args.only is None else _names(args.only, STEPS, "--only")
    if args.guard is not None and not 0 < args.guard <= 1:
        raise SystemExit(f"judge_evidence: --guard must be a top-1 probability in (0, 1], got {args.guard}")
    if args.rules_only and args.judges is not None:
        raise SystemExit("judge_evidence: --rules-only and --judges both choose the judges: give one of them")
    args.judges = () if args.rules_only else _names(args.judges, JUDGES, "--judges") if args.judges else DEFAULT_JUDGES
    if set(args.only) <= set(JUDGES) and not set(args.only) & set(args.judges):
        say = "--rules-only" if args.rules_only else f"--judges {','.join(args.judges)}"
        raise SystemExit(f"judge_evidence: {say} leaves out every judge step that --only names: nothing to run")
    if MMLU_STUDY_OFFSET + args.study_prompts > MMLU_VAL_OFFSET:  # the study must not read validation questions
        raise SystemExit(
            f"judge_evidence: --study-prompts {args.study_prompts} would reach the MMLU validation questions, which "
            f"start at {MMLU_VAL_OFFSET}: use at most {MMLU_VAL_OFFSET - MMLU_STUDY_OFFSET}"
        )
    if args.judge_prompts > args.gsm8k_val_offset:  # the judges take GSM8K train problems 0.. of the same shuffle
        raise SystemExit(
            f"judge_evidence: --judge-prompts {args.judge_prompts} would reach the validation problems, which "
            f"start at {args.gsm8k_val_offset}: use at most {args.gsm8k_val_offset}"
        )
    return args


def _names(given: str, known: tuple[str, ...], flag: str) -> tuple[str, ...]:
    """A comma-separated list of names, each one of ``known``; anything else stops with the names to use."""
    names = tuple(x.strip() for x in given.split(",") if x.strip())
    unknown = [x for x in names if x not in known]
    if unknown or not names:
        raise SystemExit(f"judge_evidence: {flag} {','.join(unknown)}: unknown name; use {', '.join(known)}")
    return names


def train_features(overrides: list[str]) -> list[str]:
    """``data_gen.features.<key>=<value>`` overrides as the ``key:value`` items of a ``train.features`` mapping."""
    out = []
    for o in overrides:
        key, sep, value = o.partition("=")
        if not key.startswith("data_gen.features.") or not sep:
            raise SystemExit(f"judge_evidence: --features {o!r}: expected data_gen.features.<key>=<value> overrides")
        out.append(f"{key.removeprefix('data_gen.features.')}:{value}")
    return out


class Plan:
    """The steps' commands, from the arguments."""

    def __init__(self, a: argparse.Namespace):
        self.a, self.root = a, Path(a.run_root)
        self.toy = a.tiny and a.gsm8k_dir is None
        if self.toy:
            a.gsm8k_dir = str(self.root / "toy_gsm8k")
        if a.gsm8k_dir and Path(a.gsm8k_dir).is_absolute():
            print(f"judge_evidence: note: --gsm8k-dir {a.gsm8k_dir} is absolute; its records resume only where the "
                  "same path string is used (a repo-relative path works on every machine)", flush=True)  # fmt: skip
        self.base = (["experiment=tiny"] if a.tiny else [f"model={a.model}"]) + [f"model.device={a.device}"]
        heads = {
            "judge_gsm8k": self.root / "judge_gsm8k" / "judge" / "head",
            "autojudge_gsm8k": self.root / "autojudge_gsm8k" / "judge" / "head",
            "autojudge_carry": self.root / "autojudge_carry" / "judge" / "head",
            "judge_mix": self.root / "judge_mix" / "judge" / "head",
        }
        self.heads = {n: d for n, d in heads.items() if n in a.judges}
        # the sweeps' and evals' judge methods: each judge, and with --guard the same head with the KL rule's
        # top-1 guard as <judge>_top1
        self.judge_methods = {n: d for n, d in self.heads.items()}
        if a.guard is not None:
            self.judge_methods.update({f"{n}{GUARD_SUFFIX}": d for n, d in self.heads.items()})

    def grid(self, step: str) -> dict[str, str]:
        """rule -> the thresholds its validation sweep decodes for a step (an eval step: its sweep's)."""
        default = GRIDS_MMLU if "mmlu" in step else GRIDS
        return {rule: getattr(self.a, rule) or grid for rule, grid in default.items()}

    def _gsm8k(self, section: str, config: str) -> list[str]:
        path = [f"{section}.dataset.path={q(self.a.gsm8k_dir)}"] if self.a.gsm8k_dir else []
        return [f"dataset@{section}.dataset={config}", *path, f"{section}.dataset.system_prompt={q(BRIEF_MATHS)}"]

    def _tau(self) -> list[str]:
        t = self.a.tau
        return (
            ["data_gen.tau.mode=quantile"]
            if t == "quantile"
            else ["data_gen.tau.mode=value", f"data_gen.tau.value={t}"]
        )

    def _autojudge(self, mode: str = "independent") -> list[str]:
        """AutoJudge labels as the signal study reads them: independent, spread over the response (or ``carry``:
        AutoJudge's whole search, in order, on along each kept swap's regenerated response)."""
        return [
            "data_gen.autojudge.enabled=true",
            f"data_gen.autojudge.mode={mode}",
            f"data_gen.autojudge.select={'spread' if mode == 'independent' else 'first'}",
            f"data_gen.autojudge.max_mismatches={self.a.autojudge_mismatches}",
            # the random tiny pair never writes EOS: let its cut responses be labelled too (never on real runs)
            *(["data_gen.autojudge.finished_only=false"] if self.a.tiny else []),
        ]

    def data_dir(self, name: str) -> Path:
        """The data folder of a judge or study step (relative to the repository root when the run root is)."""
        return self.root / name / "data"

    def judges(self) -> list[tuple[str, list[str]]]:
        """(name, pipeline overrides) of the three judges: data_gen + train."""
        a = self.a
        tau = self._tau()
        features = shlex.split(a.features)
        scalars = [f.split("=", 1)[1] for f in features if f.startswith("data_gen.features.scalars=")]
        negatives = "false" if scalars and scalars[-1].replace(" ", "") != "[]" else "true"  # gap 0 rows: trivial
        common = [
            "pipeline.stages=[data_gen,train]",
            f"judge={a.head}",
            f"data_gen.max_new_tokens={a.max_new_tokens}",
            f"data_gen.batch_size={a.gen_batch_size}",
            f"data_gen.shard_prompts={a.gen_batch_size}",  # a shard per batch: a stop loses at most one
            f"data_gen.dataset.limit={a.judge_prompts}",
            "data_gen.dataset.offset=0",
            *tau,
            f"train.use_negatives={negatives}",
        ]
        sj = f"train.quantiles=[{a.judge_quantiles}]"
        gsm8k = [*self._gsm8k("data_gen", "gsm8k_train"), *common]
        answer = [
            *gsm8k,
            *shlex.split(a.autojudge_features),
            f"train.features={{{','.join(train_features(features))}}}",
            "train.label_source=autojudge",
            f"train.quantiles=[{a.autojudge_quantiles}]",
        ]
        autojudge = [f"run_dir={self.root / 'autojudge_gsm8k'}", *answer, *self._autojudge()]
        # the carried search starts from autojudge_gsm8k's responses (its own file, once written, comes after)
        given = Path(a.bench_dir) / "evidence_autojudge_gsm8k.responses.jsonl.gz"
        carry = [
            f"run_dir={self.root / 'autojudge_carry'}",
            *answer,
            *self._autojudge("carry"),
            *([f"data_gen.responses_from={q(str(given))}"] if (REPO / given).is_file() else []),
        ]
        judges = [
            ("judge_gsm8k", [f"run_dir={self.root / 'judge_gsm8k'}", *gsm8k, *features, sj]),
            ("autojudge_gsm8k", autojudge),
            ("autojudge_carry", carry),
            (
                "judge_mix",
                [
                    f"run_dir={self.root / 'judge_mix'}",
                    f"dataset@data_gen.dataset={a.mix}",
                    f"data_gen.dataset.sources.0.system_prompt={q(BRIEF_MATHS)}",  # its maths source, as GSM8K's
                    *common,
                    *features,
                    sj,
                ],
            ),
        ]
        return [(n, o) for n, o in judges if n in self.a.only and n in self.heads]

    def studies(self) -> list[tuple[str, list[str]]]:
        """(name, pipeline overrides) of the data-only steps. study_mmlu: MMLU questions (brief reasoning, none
        that a sweep or eval decodes) in autojudge_gsm8k's layout (--autojudge-features) with its AutoJudge
        labels: the general-knowledge half of the signal study (scripts/bench_signals.py --data mmlu=<folder>)."""
        a = self.a
        mmlu = [
            f"run_dir={self.root / 'study_mmlu'}",
            "pipeline.stages=[data_gen]",
            "dataset@data_gen.dataset=mmlu",
            f"data_gen.dataset.system_prompt={q(BRIEF_MMLU)}",
            f"data_gen.dataset.limit={a.study_prompts}",
            f"data_gen.dataset.offset={MMLU_STUDY_OFFSET}",
            f"data_gen.max_new_tokens={a.max_new_tokens}",
            f"data_gen.batch_size={a.gen_batch_size}",
            f"data_gen.shard_prompts={a.gen_batch_size}",
            *self._tau(),
            *shlex.split(a.autojudge_features),
            *self._autojudge(),
        ]
        return [(n, o) for n, o in (("study_mmlu", mmlu),) if n in a.only]

    def evals(self) -> dict[str, tuple[str, list[str]]]:
        """name -> (validation sweep it takes thresholds from, or ''; pipeline overrides)."""
        a = self.a
        judges = {
            m: f"{{policy:judge,thresholds:head_quantiles,head_dir:{q(str(d))}"
            + (f",options:{{judge_strict_top1:{a.guard}}}}}" if m.endswith(GUARD_SUFFIX) else "}")
            for m, d in self.judge_methods.items()
        }

        def methods(step: str) -> str:
            grid = {rule: f"[{ths}]" for rule, ths in self.grid(step).items()}
            return "+eval.methods={" + ",".join(f"{k}:{v}" for k, v in {**grid, **judges}.items()) + "}"

        common = [
            "pipeline.stages=[eval]",
            "eval.judge_dir=null",
            "eval.autojudge_dir=null",
            f"eval.gamma={a.gamma}",
            f"eval.batch_size={a.batch_size}",
            f"eval.max_new_tokens={a.max_new_tokens}",
            "~eval.methods",
        ]
        mmlu = ["dataset@eval.dataset=mmlu", f"eval.dataset.system_prompt={q(BRIEF_MMLU)}"]
        slices = {
            "val_gsm8k": ("", [*self._gsm8k("eval", "gsm8k_train"), f"eval.dataset.offset={a.gsm8k_val_offset}"]),
            "val_mmlu": ("", [*mmlu, f"eval.dataset.offset={MMLU_VAL_OFFSET}"]),
            "eval_gsm8k": ("val_gsm8k", [*self._gsm8k("eval", "gsm8k_test_brief"), "eval.dataset.offset=0"]),
            "eval_mmlu": ("val_mmlu", [*mmlu, "eval.dataset.offset=0"]),
        }
        return {
            name: (
                val,
                [
                    f"run_dir={self.root / name}",
                    *common,
                    methods(name),
                    *ds,
                    f"eval.dataset.limit={a.eval_prompts if val else a.val_prompts}",
                ],
            )
            for name, (val, ds) in slices.items()
            if name in a.only
        }

    def eval_dir(self, name: str) -> Path:
        return self.root / name / "eval"

    def bench_name(self, name: str) -> str:
        return f"evidence_{name}_g{self.a.gamma}_b{self.a.batch_size}"

    def command(self, overrides: list[str]) -> list[str]:
        return [sys.executable, "-m", "selfjudge.pipeline.main", *self.base, *overrides, *self.a.overrides]


def bench_files(bench: Path, name: str) -> tuple[Path, Path]:
    return bench / f"{name}.per_example.jsonl.gz", bench / f"{name}.{KEY_FILE}"


def records_bytes(eval_dir: Path) -> bytes:
    """The eval's records: its records file and, while its ranks decode (pipeline.nproc_per_node), each rank's
    file (``per_example.rankNNN.jsonl``, merged into the first when they finish); whole lines only (read while
    they append)."""
    out = b""
    for f in [eval_dir / RECORDS, *sorted(eval_dir.glob(RANK_RECORDS))]:
        data = f.read_bytes() if f.is_file() else b""
        out += data[: data.rfind(b"\n") + 1]
    return out


def archive(eval_dir: Path, bench: Path, name: str) -> None:
    """The eval's records, gzipped (no name or time in the header, so equal records give equal bytes), and its
    key beside them; files are rewritten only when their content changed."""
    from selfjudge.io import atomic_write_bytes

    key = eval_dir / KEY_FILE
    data = records_bytes(eval_dir)
    if not data or not key.is_file():
        return
    gz, key_out = bench_files(bench, name)
    if not gz.is_file() or gzip.decompress(gz.read_bytes()) != data:
        atomic_write_bytes(gz, gzip.compress(data, mtime=0))
        n = data.count(b"\n")
        print(f"judge_evidence: {name}: {n} records -> {gz} (commit it with {key_out.name})", flush=True)
    if not key_out.is_file() or key_out.read_bytes() != key.read_bytes():
        atomic_write_bytes(key_out, key.read_bytes())


def archive_labels(data: Path, labels: Path, name: str) -> None:
    """The AutoJudge labels of a judge's data folder (the shards written so far) to ``labels``, and the responses
    they were made for beside them (:func:`responses_file`): the regenerations are most of a run's cost, so a run
    on another machine takes both back (data_gen.autojudge_labels_from, data_gen.responses_from) and teacher-forces
    the labelled responses (its own bf16 greedy responses may differ, and labels bind to a response)."""
    from selfjudge.autojudge import export_labels
    from selfjudge.responses import export_responses
    from selfjudge.shards import MANIFEST, RUN_INFO, SHARD_DIR

    if not labels.is_file() and not any((data / SHARD_DIR).glob("*.parquet")):
        return  # no shard written yet: no file to commit
    if (data / MANIFEST).is_file() or (data / SHARD_DIR / RUN_INFO).is_file():
        for path, export, what in (
            (labels, export_labels, "AutoJudge labels"),
            (responses_file(labels), export_responses, "responses"),
        ):
            before = path.read_bytes() if path.is_file() else None
            n = export(data, path)
            if path.read_bytes() != before:
                print(f"judge_evidence: {name}: {n} {what} -> {path} (commit it)", flush=True)


def labelled_ids(labels: Path) -> list[str]:
    """The prompt ids of the responses file beside a labels file (--labelled-only)."""
    from selfjudge.io import read_jsonl_gz
    from selfjudge.responses import RESPONSES_FORMAT

    path = responses_file(labels)
    if not path.is_file():
        raise SystemExit(f"judge_evidence: --labelled-only: no responses file {path}; run without it first")
    return sorted(r["id"] for r in read_jsonl_gz(path, RESPONSES_FORMAT, "--labelled-only", "a responses file")[1])


def responses_file(labels: Path) -> Path:
    """The responses file beside a labels file (``evidence_<step>.responses.jsonl.gz``)."""
    return labels.with_name(labels.name.replace(".autojudge_labels.", ".responses."))


def restore(eval_dir: Path, bench: Path, name: str, dataset_path: str | None) -> bool:
    """Committed records back into an eval folder that has none (and their key beside them): the eval resumes."""
    from selfjudge.io import atomic_write_bytes

    dst = eval_dir / RECORDS
    gz, key = bench_files(bench, name)
    if (dst.is_file() and dst.stat().st_size) or any(eval_dir.glob(RANK_RECORDS)) or not gz.is_file():
        return False  # records here (ranks' files too: the next run merges them) are newer than the committed
    if not key.is_file():
        raise SystemExit(
            f"judge_evidence: {gz} has no {key.name} beside it: without the key the eval would set the records "
            f"aside; commit {key.name} from the machine that made them, or delete {gz.name} to start {name} over"
        )
    made_with = (json.loads(key.read_text()).get("dataset") or {}).get("path")
    if made_with != dataset_path:
        raise SystemExit(
            f"judge_evidence: {gz.name} was decoded with dataset path {made_with!r}, this run uses {dataset_path!r}: "
            f"the eval would set those records aside. Pass --gsm8k-dir {made_with or '(none: the hub)'} "
            "(the same string), or delete the committed files to start over"
        )
    atomic_write_bytes(eval_dir / KEY_FILE, key.read_bytes())
    atomic_write_bytes(dst, gzip.decompress(gz.read_bytes()))
    print(f"judge_evidence: {name}: restored {dst} from {gz} (the eval resumes from them)", flush=True)
    return True


def run(step: str, cmd: list[str], tick=None, every: float = 120.0) -> None:
    """One command in the repository root; a stop (Ctrl-C, SIGTERM) stops it too before going on up.
    ``tick()`` runs every ``every`` seconds while it works (the eval's records archived as they grow)."""
    print(f"\n=== {step}\n+ {shlex.join(cmd)}", flush=True)
    proc = subprocess.Popen(cmd, cwd=REPO)
    try:
        while True:
            try:
                rc = proc.wait(timeout=every if tick else None)
                break
            except subprocess.TimeoutExpired:
                tick()
    except BaseException:
        from selfjudge.io import stop_process

        stop_process(proc)
        raise
    if rc:
        raise SystemExit(
            f"judge_evidence: step {step} failed (exit status {rc}); its messages are above. Fix the cause and "
            "rerun the same command: finished steps are skipped and this one resumes"
        )


def sweep_missing(plan: Plan, recs: list[dict], n: int | None, val: str) -> list[str]:
    """The points of this run's grid for the validation sweep ``val`` (lossless; its rules' thresholds; each judge
    in --judges at its head's stored cuts, or as a whole when untrained) that the sweep's records do not hold for
    n prompts (None: for any prompt)."""
    prompts: dict[tuple[str, float | None], set] = {}
    for r in recs:
        prompts.setdefault((r["method"], r.get("threshold")), set()).add(r.get("prompt_id"))
    need = 1 if n is None else n
    missing = [] if len(prompts.get(("lossless", None), ())) >= need or n is None else ["lossless"]
    grid = [(m, float(t)) for m, ths in plan.grid(val).items() for t in ths.split(",")]
    for name, head in plan.judge_methods.items():
        config = REPO / head / "judge_config.json"
        cuts = json.loads(config.read_text()).get("thresholds", {}).get("quantiles") if config.is_file() else None
        if cuts:
            grid += [(name, float(c)) for c in cuts]
        elif name not in {m for m, _ in prompts}:
            missing.append(name)
    return missing + [f"{m}@{t:g}" for m, t in grid if len(prompts.get((m, t), ())) < need]


def pick(plan: Plan, val: str) -> list[str]:
    """scripts/pick_thresholds.py on a validation sweep, for this run's rules and judges -> overrides of the
    eval (methods with no pick: removed). A sweep still decoding other methods (a judge added later, not in
    --judges) serves once every point of this run's grid is finished for all its prompts."""
    from selfjudge.io import MARKER

    val_dir = REPO / plan.eval_dir(val)
    here = val_dir / RECORDS
    recs = _lines(here.read_bytes()) if here.is_file() else []
    finished = (val_dir / MARKER).is_file()  # then its prompts are lossless's (a dataset may hold fewer)
    n = len({r["prompt_id"] for r in recs if r["method"] == "lossless"}) if finished else plan.a.val_prompts
    missing = sweep_missing(plan, recs, n, val)
    if missing:
        raise SystemExit(
            f"judge_evidence: {val_dir} is not a finished validation sweep for this run's methods (not yet "
            f"decoded for all {n} prompts: {', '.join(missing)}): run the step {val} first "
            f"(--only {val}, or without --only), then this one"
        )
    if not finished:
        print(f"judge_evidence: {val_dir}: every point of this run's grid is finished (other methods are still "
              "being decoded there); picking on those", flush=True)  # fmt: skip
    if str(REPO / "scripts") not in sys.path:
        sys.path.insert(0, str(REPO / "scripts"))
    import pick_thresholds

    methods = ",".join([*GRIDS, *plan.judge_methods])
    result = pick_thresholds.main([str(val_dir), "--max-loss", str(plan.a.max_loss), "--methods", methods])
    dropped = [m for m, c in result["choices"].items() if not c["chosen"]]
    for m in dropped:
        print(f"judge_evidence: {m}: no threshold picked on {val_dir}; left out of the eval", flush=True)
    return [*result["overrides"], *(f"~eval.methods.{m}" for m in dropped)]


def _stop(signum, frame):  # SIGTERM (a scheduler's time limit): stop the step and archive like Ctrl-C
    raise KeyboardInterrupt(f"signal {signum}")


def make_data(plan: Plan, bench: Path, name: str, overrides: list[str]) -> None:
    """A judge's or study's step. With AutoJudge labels, those (the costly part) go to
    ``<bench>/evidence_<name>.autojudge_labels.jsonl.gz`` as shards land, and a run finding that file takes them."""
    if "data_gen.autojudge.enabled=true" not in overrides:
        run(name, plan.command(overrides))
        return
    labels = bench / f"evidence_{name}.autojudge_labels.jsonl.gz"
    data = REPO / plan.data_dir(name)

    def keep_labels():
        archive_labels(data, labels, name)

    for path, key in ((labels, "autojudge_labels_from"), (responses_file(labels), "responses_from")):
        if path.is_file():  # an earlier run's labels and responses (here or committed): taken, not made again
            given = path.relative_to(REPO) if path.is_relative_to(REPO) else path  # commands run in REPO
            overrides = [*overrides, f"data_gen.{key}={q(str(given))}"]
    if plan.a.labelled_only and name in JUDGES:
        overrides = [*overrides, f"data_gen.dataset.ids=[{','.join(q(i) for i in labelled_ids(labels))}]"]
    try:
        run(name, plan.command(overrides), tick=keep_labels)
    finally:
        keep_labels()


def execute(plan: Plan, bench: Path, evals: dict[str, tuple[str, list[str]]]) -> None:
    a = plan.a
    if plan.toy:
        toy_gsm8k(REPO / a.gsm8k_dir)
    for name in evals:
        ds_path = a.gsm8k_dir if "gsm8k" in name else None
        restore(REPO / plan.eval_dir(name), bench, plan.bench_name(name), ds_path)
    training = [n for n, _ in plan.judges()]
    untrained = [
        n for n, d in plan.heads.items() if n not in training and not (REPO / d / "judge_config.json").is_file()
    ]
    if evals and untrained:
        raise SystemExit(
            f"judge_evidence: {', '.join(untrained)}: no trained head ({', '.join(str(plan.heads[n]) for n in untrained)}) "
            f"and not trained by this run: add {','.join(untrained)} to --only, or name the trained judges in --judges"
        )
    for name, overrides in plan.judges():
        make_data(plan, bench, name, overrides)
    picked: dict[str, list[str]] = {}
    for name, (val, overrides) in evals.items():
        if val and val not in picked:
            picked[val] = pick(plan, val)

        def keep(name=name):
            archive(REPO / plan.eval_dir(name), bench, plan.bench_name(name))

        try:
            run(name, plan.command([*overrides, *picked.get(val, [])]), tick=keep)
        finally:
            keep()
    for name, overrides in plan.studies():
        make_data(plan, bench, name, overrides)
    print(f"\njudge_evidence: done. Reports: {', '.join(str(plan.eval_dir(n) / 'report.md') for n in evals)}")


def _lines(data: bytes) -> list[dict]:
    """The whole JSON records of a records file (a line cut by a kill is skipped); a count, not a check."""
    out = []
    for x in data.decode("utf-8").splitlines():
        try:
            out.append(json.loads(x))
        except json.JSONDecodeError:
            continue
    return out


def status(plan: Plan, bench: Path, evals: dict[str, tuple[str, list[str]]]) -> list[str]:
    """One line per step: finished, partial (records per method, here or in the committed archive) or not
    started; nothing is written."""
    from selfjudge.io import MARKER
    from selfjudge.shards import MANIFEST, SHARD_DIR, read_progress

    def ranks_seen(data: Path) -> int:  # progress files are per rank; one rank when there are none yet
        return max(1, len(list((data / SHARD_DIR).glob("rank*.progress.json"))))

    def data_line(name: str, n: int) -> str:
        where = plan.data_dir(name)
        data = REPO / where
        done = sum(len(read_progress(data, r)["done_prompt_ids"]) for r in range(ranks_seen(data)))
        labels = bench / f"evidence_{name}.autojudge_labels.jsonl.gz"
        n_labels = gzip.decompress(labels.read_bytes()).count(b"\n") - 1 if labels.is_file() else 0  # header line
        resp = responses_file(labels)
        n_resp = gzip.decompress(resp.read_bytes()).count(b"\n") - 1 if resp.is_file() else 0
        kept = f"; {n_labels} AutoJudge labels in {labels.name}" + (
            f", {n_resp} responses in {resp.name}" if n_resp else ""
        )
        kept += " (taken back by a run without the data folder)"
        kept = kept if labels.is_file() else ""
        if not done:
            return f"{name}: not started{kept}"
        return f"{name}: data_gen {done} of {n} prompts in shards ({where}; a rerun resumes after them){kept}"

    lines = []
    for name, _ in plan.judges():
        head = plan.heads[name]
        if (REPO / head / "judge_config.json").is_file():
            lines.append(f"{name}: trained ({head})")
            continue
        if (REPO / plan.data_dir(name) / MANIFEST).is_file():
            lines.append(f"{name}: data finished, not trained ({head})")
            continue
        lines.append(data_line(name, plan.a.judge_prompts))
    for name, (val, _) in evals.items():
        ev = REPO / plan.eval_dir(name)
        gz = bench_files(bench, plan.bench_name(name))[0]
        recs = _lines(records_bytes(ev))
        if (ev / MARKER).is_file():
            missing = [] if val else sweep_missing(plan, recs, None, name)  # a point added after it finished
            older = f"; not yet decoded: {', '.join(missing)} (a rerun decodes only those)" if missing else ""
            lines.append(f"{name}: finished ({plan.eval_dir(name)}){older}")
            continue
        where = str(plan.eval_dir(name))
        if not recs and gz.is_file():
            recs = _lines(gzip.decompress(gz.read_bytes()))
            where = f"{gz.relative_to(REPO) if gz.is_relative_to(REPO) else gz} (committed; restored at the next run)"
        if not recs:
            lines.append(f"{name}: not started" + (f" (thresholds from {val})" if val else ""))
            continue
        n = plan.a.eval_prompts if val else plan.a.val_prompts
        per: dict[str, int] = {}
        for r in recs:
            k = r["method"] + ("" if r.get("threshold") is None else f"@{r['threshold']:g}")
            per[k] = per.get(k, 0) + 1
        parts = ", ".join(f"{k} {v}" for k, v in per.items())
        lines.append(f"{name}: partial, {len(recs)} records of {n} prompts each: {parts} [{where}]")
    for name, _ in plan.studies():
        where = plan.data_dir(name)
        finished = (REPO / where / MANIFEST).is_file()
        lines.append(f"{name}: data finished ({where})" if finished else data_line(name, plan.a.study_prompts))
    return lines


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    plan = Plan(a)
    bench = REPO / a.bench_dir  # an absolute --bench-dir stays as given
    evals = plan.evals()
    if a.status:
        print("\n".join(status(plan, bench, evals)))
        return
    if a.dry_run:
        for name, overrides in [*plan.judges(), *plan.studies()]:
            print(f"# {name}\n{shlex.join(plan.command(overrides))}")
        for name, (val, overrides) in evals.items():
            picked = [f"<thresholds picked on {plan.eval_dir(val)}>"] if val else []
            print(f"# {name} (records: {bench_files(bench, plan.bench_name(name))[0]})")
            print(shlex.join(plan.command([*overrides, *picked])))
        return
    signal.signal(signal.SIGTERM, _stop)
    try:
        execute(plan, bench, evals)
    except KeyboardInterrupt:
        raise SystemExit("judge_evidence: stopped; records are archived. Rerun the same command to resume") from None


if __name__ == "__main__":
    main()
