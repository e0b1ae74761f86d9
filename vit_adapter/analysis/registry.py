"""The ablation registry, ``ablations/index.yml``: every variant's label, role, table rows and paper row, the
tables themselves and the paper findings the report checks.

The analysis reads variant names only from here, so adding an ablation is an overlay plus one registry entry
(docs/ablations.md, "Adding an ablation"). Every mistake in the file is a one-line ``RegistryError`` naming the
file and the dotted key, with a did-you-mean for a misspelt key, table, variant or paper row.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from vit_adapter.utils.paths import project_root

DEFAULT_REGISTRY = project_root() / "ablations" / "index.yml"
NAME_RE = re.compile(r"^[A-Za-z0-9_]+$")  # a variant is also a directory and a DVC stage name

# Roles the report's sentences are written for; each names at most one variant (the reference exactly one).
UNIQUE_ROLES = ("reference", "baseline", "compute_matched", "attention")
ROLES = (*UNIQUE_ROLES, "component", "leave_one_out", "interactions", "pretraining", "other")
EXTRAS = ("components", "interactions")
PANELS = ("cost_ratio", "wall_time")
COST_COLUMNS = ("flops_G", "s_per_iter", "peak_memory_mb", "n_iters", "wall_time_s")  # summary.csv names
PAPER_COST_COLUMNS = ("flops_G", "train_time_s", "memory_G", "complexity")  # paper_numbers.yml keys
# What each third panel draws (plots.py): the columns its table must carry.
PANEL_NEEDS = {
    "cost_ratio": (("flops_G", "s_per_iter", "peak_memory_mb"), ("flops_G", "train_time_s", "memory_G")),
    "wall_time": (("wall_time_s",), ()),
}

_TOP_KEYS = ("variants", "tables", "findings")
_VARIANT_KEYS = ("label", "role", "paper", "tables")
_ROW_KEYS = ("row", "order", "optional", "removes")
_TABLE_KEYS = ("title", "mirrors", "reference", "extra", "costs", "paper_costs", "panel", "pretraining")
_FINDING_KEYS = ("claim", "source", "a", "b")


class RegistryError(ValueError):
    """A malformed registry; the message is one line naming the file and the key."""


@dataclass(frozen=True)
class Row:
    variant: str
    label: str
    optional: bool = False  # dropped when not run (N=6 on the CPU default, whose depth 4 does not admit it)
    removes: str | None = None  # the report states "Removing <removes> from <reference> changes ..."
    order: float = 0.0


@dataclass(frozen=True)
class TableSpec:
    name: str  # CSV stem in results/ and PNG stem in reports/figures/
    title: str
    paper_ref: str  # which paper table the rows mirror
    rows: tuple[Row, ...]
    reference: str  # the row every Δ is paired against
    extra: str | None = None  # "components" | "interactions": the paper's descriptive columns
    costs: tuple[str, ...] = ()  # our cost columns (summary names)
    paper_costs: tuple[str, ...] = ()  # paper cost columns (paper_numbers keys)
    panel: str | None = None  # a third figure panel: "cost_ratio" | "wall_time"
    pretraining: str | None = None  # what a pretrained-vs-random-init table compares (report sentence)

    @property
    def others(self) -> tuple[str, ...]:
        """The rows' variants other than the reference (the compared one of a two-row table)."""
        return tuple(r.variant for r in self.rows if r.variant != self.reference)


@dataclass(frozen=True)
class Finding:
    claim: str
    a: str  # Δ = metric(a) − metric(b), paired by seed
    b: str
    source: str


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    role: str
    paper: str | None  # key into paper_numbers.yml


@dataclass(frozen=True)
class Registry:
    path: Path
    variants: tuple[Variant, ...]  # display order
    tables: tuple[TableSpec, ...]
    findings: tuple[Finding, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.variants)

    @property
    def reference(self) -> str:
        return next(v.name for v in self.variants if v.role == "reference")  # validated: exactly one

    def role(self, role: str) -> str | None:
        """The variant holding a unique role, or None when no variant has it."""
        return next((v.name for v in self.variants if v.role == role), None)

    def table_with(self, extra: str) -> TableSpec | None:
        return next((t for t in self.tables if t.extra == extra), None)

    def sort_key(self, variant: str) -> tuple[int, str]:
        """Display order; variants the registry does not list (runs of an unregistered overlay) follow by name."""
        names = self.names
        return (names.index(variant), "") if variant in names else (len(names), variant)

    def paper_rows(self, paper: Mapping[str, dict[str, Any]], source: str | Path) -> dict[str, dict[str, Any]]:
        """Variant → its paper row (``paper`` keyed as paper_numbers.yml); variants without one are absent."""
        out = {}
        for v in self.variants:
            if v.paper is None:
                continue
            if v.paper not in paper:
                raise RegistryError(
                    f"{self.path}: variants.{v.name}.paper: no row {v.paper!r} in {source}{_hint(v.paper, paper)}"
                )
            out[v.name] = paper[v.paper]
        return out


def _hint(key: str, options: Iterable[str]) -> str:
    options = list(options)
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(options)})"


class _Reader:
    """Validates one registry file; every error names the file and the dotted key."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, why: str) -> RegistryError:
        return RegistryError(f"{self.path}: {key}: {why}")

    def mapping(
        self, value: Any, key: str, allowed: tuple[str, ...] | None = None, required: tuple[str, ...] = ()
    ) -> dict[Any, Any]:
        """``value`` as a mapping whose keys are among ``allowed`` (any key when None)."""
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a mapping, got {type(value).__name__}")
        for k in value:
            if allowed is not None and k not in allowed:
                raise self.fail(f"{key}.{k}", f"unknown key{_hint(str(k), allowed)}")
        for k in required:
            if k not in value:
                raise self.fail(key, f"lacks {k!r}")
        return value

    def text(self, value: Any, key: str, *, optional: bool = False) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, f"must be a non-empty string, got {value!r}")
        return value

    def choice(self, value: Any, key: str, options: tuple[str, ...], *, optional: bool = True) -> str | None:
        if value is None and optional:
            return None
        if value not in options:
            raise self.fail(key, f"{value!r} is not one of {', '.join(options)}{_hint(str(value), options)}")
        return str(value)

    def names(self, value: Any, key: str, options: tuple[str, ...]) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise self.fail(key, f"must be a list, got {type(value).__name__}")
        for i, item in enumerate(value):
            self.choice(item, f"{key}[{i}]", options, optional=False)
        return tuple(value)

    def known(self, value: Any, key: str, options: Iterable[str], what: str) -> str:
        options = tuple(options)
        if value not in options:
            raise self.fail(key, f"unknown {what} {value!r}{_hint(str(value), options)}")
        return str(value)


def _check_unique_keys(node: yaml.Node, reader: _Reader, where: str = "") -> None:
    """A repeated variant or table would silently replace the first one: refuse it (PyYAML keeps the last)."""
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            name = str(getattr(key, "value", key))
            dotted = f"{where}.{name}" if where else name
            if name in seen:
                raise reader.fail(dotted, f"repeated key at line {key.start_mark.line + 1}")
            seen.add(name)
            _check_unique_keys(value, reader, dotted)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique_keys(item, reader, f"{where}[{i}]")


def _parse(path: Path) -> Registry:
    r = _Reader(path)
    try:
        text = path.read_text(encoding="utf-8")
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except OSError as err:
        raise RegistryError(f"cannot read the ablation registry {path}: {err.strerror or err}") from err
    except yaml.YAMLError as err:
        raise RegistryError(f"{path}: invalid YAML: {' '.join(str(err).split())}") from err
    if node is not None:
        _check_unique_keys(node, r)
    raw = r.mapping(raw, "(top level)", _TOP_KEYS, required=("variants", "tables"))

    variants_raw, tables_raw = r.mapping(raw["variants"], "variants"), r.mapping(raw["tables"], "tables")
    if not variants_raw:
        raise r.fail("variants", "lists no variant")
    table_names = tuple(str(t) for t in tables_raw)
    variants: list[Variant] = []
    rows: dict[str, list[tuple[Row, int]]] = {t: [] for t in table_names}
    for index, (name, entry) in enumerate(variants_raw.items()):
        key = f"variants.{name}"
        if not NAME_RE.match(str(name)):
            raise r.fail(key, "a variant name is letters, digits and '_' (it names a directory and a DVC stage)")
        entry = r.mapping(entry, key, _VARIANT_KEYS, required=("label", "role"))
        label = r.text(entry["label"], f"{key}.label")
        role = r.choice(entry["role"], f"{key}.role", ROLES, optional=False)
        paper = r.text(entry.get("paper"), f"{key}.paper", optional=True)
        variants.append(Variant(str(name), str(label), str(role), paper))
        member = entry.get("tables") or {}
        if isinstance(member, list):
            member = {t: None for t in r.names(member, f"{key}.tables", table_names)}
        for table, spec in r.mapping(member, f"{key}.tables", table_names).items():
            rkey = f"{key}.tables.{table}"
            if spec is None or isinstance(spec, str):
                spec = {"row": spec}
            spec = r.mapping(spec, rkey, _ROW_KEYS)
            order = spec.get("order", 0)
            if isinstance(order, bool) or not isinstance(order, int | float) or not math.isfinite(order):
                raise r.fail(f"{rkey}.order", f"must be a number, got {order!r}")
            optional = spec.get("optional", False)
            if not isinstance(optional, bool):
                raise r.fail(f"{rkey}.optional", f"must be true or false, got {optional!r}")
            row = Row(
                variant=str(name),
                label=str(r.text(spec.get("row"), f"{rkey}.row", optional=True) or label),
                optional=optional,
                removes=r.text(spec.get("removes"), f"{rkey}.removes", optional=True),
                order=float(order),
            )
            rows[str(table)].append((row, index))

    for role in UNIQUE_ROLES:
        holders = [v.name for v in variants if v.role == role]
        if len(holders) > 1 or (role == "reference" and not holders):
            why = "no variant has" if not holders else f"{', '.join(holders)} all have"
            rule = "exactly one variant must" if role == "reference" else "at most one variant may"
            raise r.fail("variants", f"{why} role {role!r}; {rule} hold it")
    names = tuple(v.name for v in variants)
    reference = next(v.name for v in variants if v.role == "reference")

    tables = []
    for name, entry in tables_raw.items():
        key = f"tables.{name}"
        entry = r.mapping(entry, key, _TABLE_KEYS, required=("title", "mirrors"))
        # A table's rows: by their `order`, then by display order (a stable sort keeps the registry's order).
        members = tuple(row for row, _ in sorted(rows[str(name)], key=lambda ri: (ri[0].order, ri[1])))
        if not members:
            raise r.fail(key, "no variant lists this table under its `tables`")
        spec = TableSpec(
            name=str(name),
            title=str(r.text(entry["title"], f"{key}.title")),
            paper_ref=str(r.text(entry["mirrors"], f"{key}.mirrors")),
            rows=members,
            extra=r.choice(entry.get("extra"), f"{key}.extra", EXTRAS),
            costs=r.names(entry.get("costs", []), f"{key}.costs", COST_COLUMNS),
            paper_costs=r.names(entry.get("paper_costs", []), f"{key}.paper_costs", PAPER_COST_COLUMNS),
            reference=r.known(entry.get("reference", reference), f"{key}.reference", names, "variant"),
            panel=r.choice(entry.get("panel"), f"{key}.panel", PANELS),
            pretraining=r.text(entry.get("pretraining"), f"{key}.pretraining", optional=True),
        )
        two_rows = spec.panel == "cost_ratio" or spec.pretraining is not None
        if two_rows and (len(spec.rows) != 2 or len(spec.others) != 1):
            raise r.fail(key, "a cost_ratio or pretraining table is its reference row and exactly one other row")
        if spec.panel is not None:
            ours, theirs = PANEL_NEEDS[spec.panel]
            lacking = [c for c in ours if c not in spec.costs] + [c for c in theirs if c not in spec.paper_costs]
            if lacking:
                raise r.fail(key, f"panel {spec.panel!r} needs the cost columns {', '.join(lacking)}")
        tables.append(spec)
    if sum(t.extra == "interactions" for t in tables) > 1:
        raise r.fail("tables", "at most one table has extra: interactions (it is the metric-vs-N figure)")

    findings = []
    seen: set[tuple[str, str]] = set()
    items = raw.get("findings") or []
    if not isinstance(items, list):
        raise r.fail("findings", f"must be a list, got {type(items).__name__}")
    for i, item in enumerate(items):
        key = f"findings[{i}]"
        item = r.mapping(item, key, _FINDING_KEYS, required=_FINDING_KEYS)
        a, b = (r.known(item[k], f"{key}.{k}", names, "variant") for k in ("a", "b"))
        if (a, b) in seen or a == b:
            raise r.fail(key, f"compares {a} with {b} {'again' if a != b else '(itself)'}")
        seen.add((a, b))
        claim, source = (str(r.text(item[k], f"{key}.{k}")) for k in ("claim", "source"))
        findings.append(Finding(claim=claim, a=a, b=b, source=source))
    return Registry(path=path, variants=tuple(variants), tables=tuple(tables), findings=tuple(findings))


@lru_cache(maxsize=8)
def _cached(path: Path, mtime_ns: int, size: int) -> Registry:
    return _parse(path)


def load_registry(path: str | Path | None = None) -> Registry:
    """The registry at ``path`` (default ``ablations/index.yml``), parsed once per file version."""
    path = Path(path) if path is not None else DEFAULT_REGISTRY
    try:
        st = path.stat()
    except OSError as err:
        raise RegistryError(f"cannot read the ablation registry {path}: {err.strerror or err}") from err
    return _cached(path, st.st_mtime_ns, st.st_size)
