"""An in-context-learning eval bundle (DCLM's ``eval_bundle``, as nanochat and the Parcae reference use it).

A bundle is a folder, a ``.zip`` of one, or an ``s3://`` prefix (read through boto3; nothing is ever
downloaded from anywhere else)::

    core.yaml              icl_tasks: [{label, dataset_uri, num_fewshot: [k, ...], icl_task_type,
                                        continuation_delimiter (default " ")}, ...]
    core_extended.yaml     the tasks Core-Extended adds to CORE (same format; optional, see below)
    eval_meta_data.csv     columns "Eval Task" and "Random baseline" (a percentage), one row per task
    eval_data/<category>/<task>.jsonl

``dataset_uri`` is relative to ``eval_data/``. Items are, per ``icl_task_type``: ``multiple_choice``
``{query, choices, gold}``; ``schema`` ``{context_options, continuation, gold}``; ``language_modeling``
``{context, continuation}``.

CORE is the mean centered accuracy over the tasks of ``core.yaml`` (DCLM's 22 low-variance tasks in the
published bundle). Core-Extended is the same mean over those tasks and the ones ``core_extended.yaml``
adds: the Parcae reference's extended list is not published in a form we can ship, so the bundle names
it, in the same format (DCLM's ``heavy.yaml`` tasks, say); a task listed in both counts once.
"""

from __future__ import annotations

import csv
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from data_prep.storage import S3Options, StorageError, is_s3, open_store
from parcae_errors import ParcaeError

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
ITEM_FIELDS = {
    "multiple_choice": ("query", "choices", "gold"),
    "schema": ("context_options", "continuation", "gold"),
    "language_modeling": ("context", "continuation"),
}
SUITES = {"core": ("core.yaml",), "core-extended": ("core.yaml", "core_extended.yaml")}
META = "eval_meta_data.csv"


class BundleError(ParcaeError):
    """A bundle file that is missing or malformed (the message names the file and the field)."""


class BundleUnreachable(BundleError):
    """The bundle's storage could not be read (an outage, or a place only the cluster reaches)."""


@dataclass(frozen=True)
class Task:
    label: str
    task_type: str
    dataset_uri: str
    num_fewshot: int
    delimiter: str
    random_baseline: float  # a fraction: the accuracy of guessing

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "type": self.task_type,
            "dataset_uri": self.dataset_uri,
            "num_fewshot": self.num_fewshot,
            "continuation_delimiter": self.delimiter,
            "random_baseline": self.random_baseline,
        }


class Bundle:
    """Reads one bundle's files by their path inside it."""

    def __init__(self, location: str, options: S3Options | None = None):
        self.location = location
        self._zip: zipfile.ZipFile | None = None
        self._root = ""
        if is_s3(location):
            self._store = open_store(location, options)
        elif Path(location).is_dir():
            self._store = open_store(location)
        elif Path(location).is_file() and zipfile.is_zipfile(location):
            self._zip = zipfile.ZipFile(location)
            names = [n for n in self._zip.namelist() if PurePosixPath(n).name == "core.yaml"]
            if not names:
                raise BundleError(f"--bundle {location}: no core.yaml in this zip (an eval_bundle folder, zipped)")
            self._root = str(PurePosixPath(min(names, key=len)).parent).strip(".")
        else:
            raise BundleError(
                f"--bundle {location}: no such directory or .zip (an eval bundle: a folder with core.yaml, "
                f"{META} and eval_data/, its .zip, or an s3:// prefix)"
            )

    def where(self, name: str) -> str:
        return f"{self.location.rstrip('/')}/{name}" if not self._zip else f"{self.location}:{self._root}/{name}"

    def read_text(self, name: str) -> str:
        try:
            if self._zip is not None:
                try:
                    data = self._zip.read(f"{self._root}/{name}" if self._root else name)
                except KeyError:
                    raise BundleError(f"{self.where(name)}: no such file in the bundle") from None
            else:
                if not self._store.exists(name):
                    raise BundleError(f"{self.where(name)}: no such file in the bundle")
                data = self._store.get_bytes(name)
        except StorageError as exc:
            raise BundleUnreachable(f"{self.where(name)}: cannot read: {exc}") from None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BundleError(f"{self.where(name)}: not UTF-8 text ({exc})") from None

    def exists(self, name: str) -> bool:
        if self._zip is not None:
            return (f"{self._root}/{name}" if self._root else name) in self._zip.namelist()
        try:
            return self._store.exists(name)
        except StorageError as exc:
            raise BundleUnreachable(f"{self.where(name)}: cannot read: {exc}") from None

    # ------------------------------------------------------------------------------------------------
    def baselines(self) -> dict[str, float]:
        """Random baseline per task label, as a fraction."""
        text = self.read_text(META)
        rows = list(csv.DictReader(io.StringIO(text)))
        if not rows or "Eval Task" not in rows[0] or "Random baseline" not in rows[0]:
            raise BundleError(f"{self.where(META)}: needs the columns 'Eval Task' and 'Random baseline'")
        baselines = {}
        for line, row in enumerate(rows, start=2):
            try:
                baselines[row["Eval Task"].strip()] = float(row["Random baseline"]) / 100.0
            except (TypeError, ValueError):
                raise BundleError(
                    f"{self.where(META)} line {line}: 'Random baseline' of {row['Eval Task']!r} is "
                    f"{row['Random baseline']!r}, not a percentage"
                ) from None
        return baselines

    def suite(self, name: str) -> list[Task]:
        """The tasks of a suite ("core", "core-extended"), each with its random baseline."""
        if name not in SUITES:
            raise BundleError(f"--tasks {name!r}: one of {', '.join([*SUITES, 'val'])}")
        files = SUITES[name]
        if not self.exists(files[0]):
            raise BundleError(
                f"{self.where(files[0])}: no such file in the bundle (an eval bundle holds core.yaml, {META} and "
                "eval_data/)"
            )
        if name == "core-extended" and not self.exists(files[1]):
            raise BundleError(
                f"{self.where(files[1])}: no such file; Core-Extended needs the list of tasks it adds to CORE, in "
                "core.yaml's format (icl_tasks: [{label, dataset_uri, num_fewshot, icl_task_type}, ...])"
            )
        baselines = self.baselines()
        tasks: dict[str, Task] = {}
        for file in files:
            for task in self._tasks(file, baselines):
                tasks.setdefault(task.label, task)
        return list(tasks.values())

    def _tasks(self, file: str, baselines: dict[str, float]) -> list[Task]:
        try:
            doc = yaml.safe_load(self.read_text(file))
        except yaml.YAMLError as exc:
            raise BundleError(f"{self.where(file)}: not YAML ({exc})") from None
        entries = doc.get("icl_tasks") if isinstance(doc, dict) else None
        if not isinstance(entries, list) or not entries:
            raise BundleError(f"{self.where(file)}: needs a non-empty list 'icl_tasks'")
        tasks = []
        for i, entry in enumerate(entries):
            where = f"{self.where(file)}: icl_tasks[{i}]"
            if not isinstance(entry, dict):
                raise BundleError(f"{where}: a mapping with label, dataset_uri, num_fewshot, icl_task_type")
            for key in ("label", "dataset_uri", "num_fewshot", "icl_task_type"):
                if key not in entry:
                    raise BundleError(f"{where}: missing '{key}'")
            label, kind = str(entry["label"]), entry["icl_task_type"]
            if kind not in TASK_TYPES:
                raise BundleError(f"{where} ({label}): icl_task_type {kind!r} is not one of {', '.join(TASK_TYPES)}")
            shots = entry["num_fewshot"]
            shots = shots[0] if isinstance(shots, list) and shots else shots
            if not isinstance(shots, int) or shots < 0:
                raise BundleError(f"{where} ({label}): num_fewshot must be a list of counts >= 0, got {shots!r}")
            if label not in baselines:
                raise BundleError(f"{self.where(META)}: no 'Random baseline' for the task {label!r} ({file})")
            delimiter = entry.get("continuation_delimiter", " ")
            tasks.append(Task(label, kind, str(entry["dataset_uri"]), shots, str(delimiter), baselines[label]))
        return tasks

    def items(self, task: Task) -> list[dict[str, Any]]:
        """The task's items, each checked for the fields its type needs."""
        name = str(PurePosixPath("eval_data") / task.dataset_uri)
        items = []
        for line_no, line in enumerate(self.read_text(name).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BundleError(f"{self.where(name)} line {line_no}: not JSON ({exc.msg})") from None
            check_item(item, task, f"{self.where(name)} line {line_no}")
            items.append(item)
        if not items:
            raise BundleError(f"{self.where(name)}: no items ({task.label})")
        return items


def check_item(item: Any, task: Task, where: str) -> None:
    if not isinstance(item, dict):
        raise BundleError(f"{where}: an item must be a JSON object")
    for key in ITEM_FIELDS[task.task_type]:
        if key not in item:
            raise BundleError(
                f"{where}: missing '{key}' (a {task.task_type} item of {task.label} needs "
                f"{', '.join(ITEM_FIELDS[task.task_type])})"
            )
    options = item.get("choices") if task.task_type == "multiple_choice" else item.get("context_options")
    if options is not None:
        if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
            raise BundleError(
                f"{where}: '{'choices' if task.task_type == 'multiple_choice' else 'context_options'}'"
                " must be a list of two or more strings"
            )
        gold = item.get("gold")
        if not isinstance(gold, int) or not 0 <= gold < len(options):
            raise BundleError(f"{where}: 'gold' must be an index into the {len(options)} options, got {gold!r}")
