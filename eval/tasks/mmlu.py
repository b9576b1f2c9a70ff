"""MMLU, 5-shot, as lm-evaluation-harness scores it: subject header, dev-split exemplars, "Answer:", and
the log-likelihood of " A" / " B" / " C" / " D"; accuracy per subject, micro (per question) and macro
(mean of subjects).

Data (``--mmlu-data``): ``hub`` (``cais/mmlu`` through ``datasets``; needs the network or its cache),
a folder in the original Hendrycks layout (``dev/<subject>_dev.csv``, ``test/<subject>_test.csv``; no
header; question, A, B, C, D, answer letter), or a JSONL file of {question, choices, answer, subject[, split]}
(without ``split``, each subject's first 5 records are its exemplars).
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

from ..store import ItemStore
from . import TaskError, run_items

SETTINGS = ("mmlu_data", "mmlu_shots", "limit")
LETTERS = "ABCD"
HOW_TO_GET = ("get MMLU with `python -c \"import datasets; datasets.load_dataset('cais/mmlu', 'all')\"` on a "
              "machine with network access (then --mmlu-data hub), or download "
              "https://people.eecs.berkeley.edu/~hendrycks/data.tar and pass its data/ folder")


def _record(question: str, choices: list[str], answer) -> dict:
    if len(choices) != 4:
        raise TaskError(f"mmlu: a question needs 4 choices, got {len(choices)}: {question[:60]!r}")
    answer = LETTERS.index(answer.strip()) if isinstance(answer, str) else int(answer)
    return {"question": question, "choices": [str(c) for c in choices], "answer": answer}


def _from_folder(root: Path) -> dict:
    data: dict = defaultdict(lambda: {"dev": [], "test": []})
    for split in ("dev", "test"):
        for f in sorted((root / split).glob(f"*_{split}.csv")):
            subject = f.name[: -len(f"_{split}.csv")]
            with open(f, newline="", encoding="utf-8") as fh:
                for row in csv.reader(fh):
                    if len(row) != 6:
                        raise TaskError(f"mmlu: {f} has a row with {len(row)} columns; expected question,A,B,C,D,answer")
                    data[subject][split].append(_record(row[0], row[1:5], row[5]))
    return dict(data)


def _from_jsonl(path: Path) -> dict:
    data: dict = defaultdict(lambda: {"dev": [], "test": []})
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            item = _record(rec["question"], rec["choices"], rec["answer"])
            subject, split = rec["subject"], rec.get("split")
        except (json.JSONDecodeError, KeyError, ValueError) as err:
            raise TaskError(f"mmlu: {path}:{n} is not a {{question, choices, answer, subject}} record ({err})") from err
        if split is None:
            split = "dev" if len(data[subject]["dev"]) < 5 else "test"
        data[subject]["dev" if split == "dev" else "test"].append(item)
    return dict(data)


def _from_hub() -> dict:
    try:
        import datasets

        ds = datasets.load_dataset("cais/mmlu", "all")
    except Exception as err:  # offline, no cache, no datasets package
        raise TaskError(f"mmlu: could not load cais/mmlu from the HF hub ({type(err).__name__}); {HOW_TO_GET}") from err
    data: dict = defaultdict(lambda: {"dev": [], "test": []})
    for split in ("dev", "test"):
        for rec in ds[split]:
            data[rec["subject"]][split].append(_record(rec["question"], rec["choices"], rec["answer"]))
    return dict(data)


def load_mmlu(source: str | None) -> dict:
    if source in (None, "hub"):
        return _from_hub()
    path = Path(source)
    if path.is_dir() and (path / "test").is_dir():
        data = _from_folder(path)
    elif path.is_file() and path.suffix == ".jsonl":
        data = _from_jsonl(path)
    else:
        raise TaskError(f"mmlu: {source} is neither a folder with dev/ and test/ CSVs nor a .jsonl file; {HOW_TO_GET}")
    if not any(d["test"] for d in data.values()):
        raise TaskError(f"mmlu: no test questions found in {source}")
    return data


def format_question(rec: dict, with_answer: bool) -> str:
    text = rec["question"].strip() + "\n" + "".join(f"{L}. {c}\n" for L, c in zip(LETTERS, rec["choices"])) + "Answer:"
    return text + f" {LETTERS[rec['answer']]}" if with_answer else text


def prompt(subject: str, shots: list[dict], rec: dict) -> str:
    header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return header + "".join(format_question(s, True) + "\n\n" for s in shots) + format_question(rec, False)


def run(model, opts, folder) -> dict:
    data = load_mmlu(opts.mmlu_data)
    items = []
    for subject in sorted(data):
        shots = data[subject]["dev"][: opts.mmlu_shots]
        tests = data[subject]["test"][: opts.limit] if opts.limit else data[subject]["test"]
        items += [(f"{subject}/{i}", (subject, prompt(subject, shots, rec), rec["answer"])) for i, rec in enumerate(tests)]
    store = ItemStore(folder, model, "mmlu", {k: getattr(opts, k, None) for k in SETTINGS})

    def compute(payloads):
        scores, counts = model.choose([p for _, p, _ in payloads], [f" {L}" for L in LETTERS])
        return [{"subject": s, "correct": max(range(4), key=sc.__getitem__) == ans, "counts": c}
                for (s, _, ans), sc, c in zip(payloads, scores, counts)]

    values = run_items(store, items, model.batch_size, compute, f"{model.name} mmlu")
    meter, per_subject = model.cr_meter(), defaultdict(list)
    for v in values.values():
        meter.add(v["counts"])
        per_subject[v["subject"]].append(v["correct"])
    acc = {s: sum(c) / len(c) for s, c in sorted(per_subject.items())}
    micro = sum(sum(c) for c in per_subject.values()) / sum(len(c) for c in per_subject.values())
    return {"accuracy_micro": micro, "accuracy_macro": sum(acc.values()) / len(acc), "questions": len(values),
            "subjects": len(acc), "per_subject": acc, **meter.summary()}
