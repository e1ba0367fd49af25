"""Loading job specs: YAML, ``${ENV_VAR}`` interpolation, dotted ``--set`` overrides, readable errors.

Values taken from environment variables whose names have a secret-looking part (``_KEY``,
``SECRET``, ``TOKEN``, ``PASSWORD``, ``CREDENTIALS``...: ``AWS_SECRET_ACCESS_KEY`` but not
``PARCAE_TOKENIZER``) never leave the process in clear (`pipeline.jobspec.secrets`): error messages,
log lines and saved specs show ``${NAME}`` instead.

A spec file must be UTF-8 YAML whose mappings have no repeated key (YAML would let a second ``model:``
replace the first wholesale); `load_yaml` refuses both with the line numbers.

Paths (one rule, `absolute_paths`): a relative local path in a spec, or in a ``--set``, means relative to
the directory the command runs in, as on a shell's command line, and becomes absolute when the spec is
loaded: `parcae validate` shows and checks the same paths `parcae train` uses, and the spec a run saves
names its files wherever it is read from. ``${SPEC_DIR}`` is the spec file's own directory, for paths
written relative to the file (``tokenizer.path: ${SPEC_DIR}/../tok/t.model``). A run directory moved or
copied elsewhere is read with `load_run_spec`, which moves the run's own files along with it.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from data_prep.storage import write_text
from parcae_errors import UsageError
from pipeline.jobspec.schema import JobSpec, RuleViolations, find_spec_class, is_base_config_path
from pipeline.jobspec.secrets import is_secret_name, redact, remember

ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
SPEC_DIR = "SPEC_DIR"  # ${SPEC_DIR}: the directory of the spec file being loaded


class YamlProblem(ValueError):
    """A YAML text that cannot be read as intended: the message starts with the line."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key repeated in one mapping (merge keys ``<<`` excepted)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in first:
                raise YamlProblem(
                    f"line {line}: key {key!r} appears twice in one mapping (first at line {first[key]}); "
                    "the second would silently replace the first: merge them into one"
                )
            first[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(data: bytes | str, source: str) -> Any:
    """Parse UTF-8 YAML; raise `YamlProblem` naming the line (or byte) and what is wrong."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise YamlProblem(
                f"line {line} (byte {exc.start}): not UTF-8 ({exc.reason}); save {source} as UTF-8"
            ) from None
    try:
        return yaml.load(data, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise YamlProblem(f"{where}not valid YAML: {problem}") from None


class SpecError(UsageError):
    """An invalid job spec. ``problems`` holds one line per problem, each starting with a dotted path."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        super().__init__(f"{source}: invalid job spec ({count}):\n" + "\n".join(f"  {p}" for p in problems))


@dataclass
class LoadedSpec:
    """A validated spec plus what is needed to show or save it without leaking secrets."""

    spec: JobSpec
    source: str
    secrets: dict[str, str] = field(default_factory=dict)  # secret value -> "${NAME}"

    def redact(self, text: str) -> str:
        return redact(text, self.secrets)

    def to_yaml(self) -> str:
        """The resolved spec as YAML, with secret values put back as ``${NAME}`` placeholders."""
        data = self.spec.model_dump(mode="json")
        return redact(yaml.safe_dump(data, sort_keys=False), self.secrets, url_passwords=False)

    def save(self, path: str | Path) -> Path:
        """The resolved spec (secrets as placeholders), written atomically."""
        write_text(Path(path), self.to_yaml())
        return Path(path)


def load_spec(
    path: str | Path,
    overrides: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> LoadedSpec:
    """Read, interpolate, override and validate a spec file; raise `SpecError` listing every problem."""
    environ = {**(os.environ if environ is None else environ), SPEC_DIR: str(Path(path).resolve().parent)}
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise SpecError(source, [f"cannot read the spec file: {exc.strerror or exc}"]) from None
    try:
        data = load_yaml(raw, source)
    except YamlProblem as exc:
        raise SpecError(source, [str(exc)]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(source, [f"the top level must be a mapping of sections, got {type(data).__name__}"])
    return resolve_spec(data, source, overrides, environ)


def resolve_spec(
    data: dict[str, Any],
    source: str,
    overrides: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> LoadedSpec:
    environ = os.environ if environ is None else environ
    problems: list[str] = []
    secrets: dict[str, str] = {}
    for item in overrides:
        problem = apply_override(data, item)
        if problem:
            problems.append(problem)
    data = interpolate(data, environ, secrets, problems, ())
    if problems:
        raise SpecError(source, problems)
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError:
        raise SpecError(source, [redact(p, secrets) for p in collect_problems(data)]) from None
    return LoadedSpec(spec=absolute_paths(spec, Path.cwd()), source=source, secrets=secrets)


def _absolute(location: str | None, base: Path) -> str | None:
    """A local path made absolute against ``base`` and normalised (``a/../b`` is ``b``); s3:// stays."""
    if not location or "://" in location:
        return location
    return os.path.normpath(base / location)


def absolute_paths(spec: JobSpec, base: Path) -> JobSpec:
    """Every local path of ``spec`` made absolute against ``base`` (the module doc's rule), in place."""
    spec.run_dir = _absolute(spec.run_dir, base)
    spec.tokenizer.path = _absolute(spec.tokenizer.path, base)
    data = spec.data
    data.train_url, data.val_url = _absolute(data.train_url, base), _absolute(data.val_url, base)
    for source in data.sources or []:
        source.url = _absolute(source.url, base) or source.url
        source.val_url = _absolute(source.val_url, base)
    ckpt = spec.checkpoint
    ckpt.dir, ckpt.staging_dir = _absolute(ckpt.dir, base), _absolute(ckpt.staging_dir, base)
    ckpt.init_from = _absolute(ckpt.init_from, base)
    spec.logging.tensorboard_dir = _absolute(spec.logging.tensorboard_dir, base)
    spec.eval.downstream.bundle = _absolute(spec.eval.downstream.bundle, base)
    if is_base_config_path(spec.zero.base_config):
        spec.zero.base_config = _absolute(spec.zero.base_config, base) or spec.zero.base_config
    return spec


# Stand-ins for required values that had to be set aside, so that later passes can still check rules.
_PLACEHOLDERS: dict[tuple[str, ...], Any] = {
    ("name",): "placeholder",
    ("data",): {"train_url": "placeholder"},
    ("data", "train_url"): "placeholder",
    ("training",): {"micro_batch_size": 1, "total_steps": 1},
    ("training", "total_steps"): 1,
}
_MAX_PASSES = 6


def collect_problems(data: dict[str, Any]) -> list[str]:
    """Every problem of an invalid spec, not just the first layer of them.

    Pydantic runs a model's cross-field rules only once its fields are valid, and the job-level
    rules only once every section is. So validate again with the offending values set aside
    (defaults or placeholders in their place) until nothing new turns up, and report a rule only
    when none of the fields it reads was set aside.
    """
    lines: list[str] = []
    set_aside: set[tuple[str, ...]] = set()
    current = copy.deepcopy(data)
    for _ in range(_MAX_PASSES):
        try:
            JobSpec.model_validate(current)
            break
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
        before = len(set_aside)
        for err in errors:
            loc = tuple(str(p) for p in err["loc"])
            cause = (err.get("ctx") or {}).get("error")
            if isinstance(cause, RuleViolations):
                for problem in cause.problems:
                    deps = [(*loc, *d.split(".")) for d in (problem.deps or (problem.path,))]
                    if not any(_within(dep, set_aside) for dep in deps):
                        path = ".".join((*loc, problem.path))
                        lines.append(f"{path}: {problem.message} (got {_show(problem.value)})")
                    for dep in deps:
                        _set_aside(current, dep, set_aside)
                continue
            field_path = _field_path(loc)
            if _within(field_path, set_aside):
                continue
            lines.append(format_error(err))
            _set_aside(current, field_path, set_aside)
        if len(set_aside) == before:
            break
    return list(dict.fromkeys(lines))


def _field_path(loc: tuple[str, ...]) -> tuple[str, ...]:
    """The spec field a location belongs to (``eval.loop_counts.0`` -> ``eval.loop_counts``)."""
    for i, part in enumerate(loc):
        if part.isdigit():
            return loc[:i]
    return loc


def _within(path: tuple[str, ...], set_aside: set[tuple[str, ...]]) -> bool:
    return any(path[: len(p)] == p for p in set_aside)


def _set_aside(data: dict[str, Any], path: tuple[str, ...], set_aside: set[tuple[str, ...]]) -> None:
    set_aside.add(path)
    node: Any = data
    for key in path[:-1]:
        if not isinstance(node, dict) or not isinstance(node.get(key), dict):
            node[key] = {} if isinstance(node, dict) else node
            node = node[key] if isinstance(node, dict) else None
            if node is None:
                return
            continue
        node = node[key]
    if not isinstance(node, dict) or not path:
        return
    if path in _PLACEHOLDERS:
        node[path[-1]] = copy.deepcopy(_PLACEHOLDERS[path])
    else:
        node.pop(path[-1], None)


def apply_override(data: dict[str, Any], item: str) -> str | None:
    """Apply one ``a.b.c=value`` (value parsed as YAML); return a problem line or None."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        return f"--set {item!r}: expected a.b.c=value (a dotted key, '=', a YAML value)"
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node: Any = data
    parts = key.split(".")
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):  # a list item by its index: data.sources.1.url
            if not part.isdigit() or int(part) >= len(node):
                parent = ".".join(parts[:depth])
                return (
                    f"--set {key}: {parent} is a list of {len(node)}; address an item by its index 0 to {len(node) - 1}"
                )
            if last:
                node[int(part)] = value
                return None
            node = node[int(part)]
            continue
        if not isinstance(node, dict):
            parent = ".".join(parts[:depth])
            return f"--set {key}: {parent} is a value ({node!r}), not a section"
        if last:
            node[part] = value
            return None
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
    return None


def interpolate(
    value: Any,
    environ: Mapping[str, str],
    secrets: dict[str, str],
    problems: list[str],
    path: tuple[str, ...],
) -> Any:
    if isinstance(value, dict):
        return {k: interpolate(v, environ, secrets, problems, (*path, str(k))) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, environ, secrets, problems, (*path, str(i))) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in environ:
            resolved = environ[name]
            if is_secret_name(name) and resolved:
                secrets[resolved] = f"${{{name}}}"
                remember(resolved, f"${{{name}}}")
        elif default is not None:
            resolved = default
        else:
            problems.append(
                f"{'.'.join(path)}: environment variable {name} is not set (set it, or write ${{{name}:-default}})"
            )
            return match.group(0)
        return resolved

    return ENV_PATTERN.sub(substitute, value)


def format_error(err: Any) -> str:
    """One line for one pydantic error: dotted path, the bad value, and what would be accepted."""
    loc = tuple(err["loc"])
    where = ".".join(str(p) for p in loc) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{where}: unknown key{_suggest(loc)}"
    if kind == "missing":
        section = find_spec_class(loc)
        is_section = section is not None and _is_section(section, str(loc[-1]))
        return f"{where}: required {'section' if is_section else 'key'} is missing"
    accepted = _accepted_range(loc) if kind in _BOUND_ERRORS else None
    hint = f"; accepted: {accepted}" if accepted else ""
    return f"{where}: {err['msg'].removeprefix('Value error, ')}{hint} (got {_show(err.get('input'))})"


_BOUND_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number"}


def _accepted_range(loc: tuple[Any, ...]) -> str | None:
    """The field's whole accepted range from its schema, e.g. ``1 to 256`` or ``> 0 and <= 10``."""
    path = _field_path(tuple(str(p) for p in loc))
    cls = find_spec_class(path)
    if cls is None or path[-1] not in cls.model_fields:
        return None
    schema = cls.model_json_schema()["properties"].get(path[-1], {})
    options = [schema, *schema.get("anyOf", [])]
    if len(path) < len(loc):  # an item of a list
        options = [o.get("items", {}) for o in options]
    numeric = next((o for o in options if o.get("type") in ("integer", "number")), None)
    if numeric is None:
        return None
    integer = numeric["type"] == "integer"
    low = numeric.get("minimum")
    if "exclusiveMinimum" in numeric:
        low = numeric["exclusiveMinimum"] + 1 if integer else None
    high = numeric.get("maximum")
    if "exclusiveMaximum" in numeric:
        high = numeric["exclusiveMaximum"] - 1 if integer else None
    if low is not None and high is not None:
        return f"{low:g} to {high:g}" if not integer else f"{low} to {high}"
    parts = []
    if "exclusiveMinimum" in numeric and low is None:
        parts.append(f"> {numeric['exclusiveMinimum']:g}")
    elif low is not None:
        parts.append(f">= {low:g}")
    if "exclusiveMaximum" in numeric and high is None:
        parts.append(f"< {numeric['exclusiveMaximum']:g}")
    elif high is not None:
        parts.append(f"<= {high:g}")
    return " and ".join(parts) or None


def _suggest(loc: tuple[Any, ...]) -> str:
    cls = find_spec_class(loc)
    if cls is None:
        return ""
    valid = list(cls.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
    if close:
        prefix = ".".join(str(p) for p in loc[:-1])
        dotted = f"{prefix}.{close[0]}" if prefix else close[0]
        return f" (did you mean '{dotted}'?)"
    return f" (valid keys here: {', '.join(valid)})"


def _is_section(cls: type, key: str) -> bool:
    from pydantic import BaseModel

    annotation = cls.model_fields[key].annotation  # type: ignore[attr-defined]
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
