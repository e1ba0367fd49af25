"""A small eval bundle in DCLM's layout (core.yaml, core_extended.yaml, eval_meta_data.csv, eval_data/), made
here: no download. It has the three task types, few-shot > 0, a delimiter other than a space and a task whose
prompts are longer than a tiny model's context; its items are regular enough that a tiny model trained on their
texts learns them. The tests score it; `parcae check-gpu` runs CORE on it (a working path, not a benchmark)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

COLORS = ["red", "blue", "green", "white"]
THINGS = [
    "apple", "river", "house", "garden", "window", "mountain", "school", "letter", "table", "market",
    "forest", "bridge", "station", "village", "doctor", "teacher", "kitchen", "island", "road", "paper",
]  # fmt: skip
NAMES = ["Tom", "Anna", "Peter", "Maria", "John", "Sarah", "David", "Emma", "James", "Laura", "Paul", "Alice"]
NUMBERS = [
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve", "thirteen",
    "fourteen", "fifteen",
]  # fmt: skip


def color_items() -> list[dict]:
    return [{"query": f"The {t} is", "choices": COLORS, "gold": i % 4} for i, t in enumerate(THINGS)]


def pet_items() -> list[dict]:
    items = []
    for i, name in enumerate(NAMES):
        dog = i % 2 == 0
        items.append(
            {
                "context_options": [f"{name} has a dog", f"{name} has a cat"],
                "continuation": "that barks at night." if dog else "that sleeps all day.",
                "gold": 0 if dog else 1,
            }
        )
    return items


def count_items() -> list[dict]:
    return [
        {"context": " ".join(NUMBERS[i : i + 3]) + " ", "continuation": " ".join(NUMBERS[i + 3 : i + 5])}
        for i in range(len(NUMBERS) - 4)
    ]


TASKS = [
    # label, category, items, type, shots, delimiter, random baseline (%)
    ("colors", "knowledge", color_items, "multiple_choice", 3, " => ", 25.0),
    ("pets", "commonsense", pet_items, "schema", 2, " ", 50.0),
    ("counting", "symbolic", count_items, "language_modeling", 1, " ", 0.0),
]
EXTENDED = [("counting_long", "symbolic", count_items, "language_modeling", 8, " ", 0.0)]


def _entry(label: str, category: str, kind: str, shots: int, delimiter: str) -> dict:
    entry = {"label": label, "dataset_uri": f"{category}/{label}.jsonl", "num_fewshot": [shots], "icl_task_type": kind}
    if delimiter != " ":
        entry["continuation_delimiter"] = delimiter
    return entry


def make_bundle(root: Path) -> Path:
    """The bundle folder at ``root``."""
    rows = []
    for name, tasks in (("core.yaml", TASKS), ("core_extended.yaml", EXTENDED)):
        entries = []
        for label, category, items, kind, shots, delimiter, baseline in tasks:
            path = root / "eval_data" / category / f"{label}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(item) + "\n" for item in items()))
            entries.append(_entry(label, category, kind, shots, delimiter))
            rows.append(f"{category},{label},{baseline},0.0")
        (root / name).write_text(yaml.safe_dump({"icl_tasks": entries}, sort_keys=False))
    (root / "eval_meta_data.csv").write_text(
        "Category,Eval Task,Random baseline,Centered Metric\n" + "\n".join(rows) + "\n"
    )
    return root
