"""What a user sees first through DVC: the headline metrics file (`dvc metrics show`/`diff`) and the plots
(`dvc plots show`), checked on synthetic runs. The plots are rendered by dvc itself from this repo's dvc.yaml
`plots:` section and templates, in a scratch DVC project, so a template or a plot definition that dvc renders
wrongly (a missing title, an axis without its unit, one series for all variants) fails here."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_analysis import MIOU, make_run
from vit_adapter.analysis import aggregate, plots, registry
from vit_adapter.engine.config import ABLATIONS_DIR

ROOT = Path(__file__).resolve().parents[1]
DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("views")
    runs, results = root / "results" / "runs", root / "results"
    for variant, values in MIOU.items():
        for seed, v in enumerate(values):
            make_run(runs, variant, seed, v)
    assert aggregate.main(["--runs", str(runs), "--out", str(results), "--ablations", str(ABLATIONS_DIR)]) == 0
    assert plots.main(["--results", str(results), "--out", str(root / "reports" / "figures")]) == 0
    return results


# ---------------------------------------------------------------------------------------------------------
# Metrics


def test_the_only_dvc_metrics_file_is_the_flat_headline() -> None:
    declared = [next(iter(m)) if isinstance(m, dict) else m for s in DVC_YAML["stages"].values()
                for m in s.get("metrics", [])]  # fmt: skip
    assert declared == ["results/headline"]
    outs = [next(iter(o)) if isinstance(o, dict) else o for s in DVC_YAML["stages"].values() for o in s["outs"]]
    assert "results/metrics.json" in outs and "results/findings.json" in outs  # detail files: outputs only


def _expected_keys() -> set[str]:
    """From the registry and the synthetic runs: 3 keys per variant, 5 per comparison that ran (4 where the
    paper states no Δ: power is undefined there), none for a finding not run (n6)."""
    reg = registry.load_registry()
    keys = {f"{v}.{k}" for v in MIOU for k in ("mean", "ci_lo", "ci_hi")}
    for f in reg.findings:
        if {f.a, f.b} <= set(MIOU):
            keys |= {f"{f.a}-{f.b}.{k}" for k in ("delta", "ci_lo", "ci_hi", "mde", "power")}
    keys |= {f"{reg.reference}-baseline_compute_matched.{k}" for k in ("delta", "ci_lo", "ci_hi", "mde")}
    return keys


def _headline(results: Path) -> dict[str, dict[str, float]]:
    return {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in sorted((results / "headline").glob("*.json"))}


def test_headline_is_flat_numeric_short_and_its_keys_are_stable(results: Path) -> None:
    rows = _headline(results)
    doc = {f"{row}.{k}": v for row, values in rows.items() for k, v in values.items()}
    assert all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in doc.values())
    # `dvc metrics show`: one line per row with the union of the rows' keys as columns (a terminal's width);
    # `dvc metrics diff --all`: one line per number
    assert len(rows) <= 40 and len({k for values in rows.values() for k in values}) <= 6 and len(doc) <= 120
    assert set(doc) == _expected_keys()
    assert not any(k.startswith("n6") or k.endswith("-n6") or "n6-" in k for k in doc)
    # the numbers are the runs': baseline 20, 23, 23 → mean 22; full − baseline = 10 per seed (sd 1)
    assert doc["baseline.mean"] == pytest.approx(22.0)
    assert doc["full-baseline.delta"] == pytest.approx(10.0)
    assert 0 < doc["full-baseline.power"] <= 1 and doc["full-baseline.mde"] > 0
    again = results.parent / "again"
    runs = results / "runs"
    (again / "headline").mkdir(parents=True)
    (again / "headline" / "gone-row.json").write_text("{}")  # a row the new runs lack is removed
    assert aggregate.main(["--runs", str(runs), "--out", str(again), "--ablations", str(ABLATIONS_DIR)]) == 0
    assert _headline(again) == rows and not (again / "headline" / "gone-row.json").exists()
    assert all(p.stat().st_mode & 0o044 for p in (again / "headline").iterdir())  # readable by others, as 0644


# ---------------------------------------------------------------------------------------------------------
# Plots, rendered by dvc


def _render(results: Path, tmp_path: Path) -> dict[str, Any]:
    """`dvc plots show --json` in a scratch project holding this repo's plot definitions, templates and the
    synthetic runs' plot files: plot id → list of rendered Vega-Lite specs (data filled in)."""
    proj = tmp_path / "proj"
    (proj / "results").mkdir(parents=True)
    shutil.copytree(results / "plots", proj / "results" / "plots")
    shutil.copytree(results.parent / "reports", proj / "reports")
    shutil.copytree(ROOT / "vit_adapter" / "analysis" / "templates", proj / "vit_adapter" / "analysis" / "templates")
    (proj / "dvc.yaml").write_text(yaml.safe_dump({"plots": DVC_YAML["plots"]}, allow_unicode=True))
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=proj, check=True)
    out = subprocess.run([*dvc, "plots", "show", "--json"], cwd=proj, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)["data"]


def _vega(data: dict[str, Any], plot: str) -> dict[str, Any]:
    (spec,) = [p for p in data[plot] if p["type"] == "vega"]
    return spec["content"]


def _axis_titles(node: Any) -> list[tuple[str, str]]:
    """Every (channel, title) of a quantitative x/y encoding anywhere in a spec (layers and concats too); a
    nominal axis (the forest plot's findings) is named by its labels."""
    found = []
    if isinstance(node, dict):
        for ch in ("x", "y"):
            enc = (node.get("encoding") or {}).get(ch)
            if isinstance(enc, dict) and "field" in enc and enc.get("type") == "quantitative":
                found.append((ch, str(enc.get("title"))))
        for v in node.values():
            found += _axis_titles(v)
    elif isinstance(node, list):
        for v in node:
            found += _axis_titles(v)
    return found


@pytest.fixture(scope="module")
def rendered(results: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _render(results, tmp_path_factory.mktemp("dvcplots"))


def test_every_plot_has_a_title_and_every_axis_its_unit(rendered: dict[str, Any]) -> None:
    vega = [k for k, v in rendered.items() if any(p["type"] == "vega" for p in v)]
    assert set(vega) == {"findings_forest", "train_loss", "metric_vs_n", "paper_metric_vs_n", "cost_vs_metric"}
    for plot in vega:
        spec = _vega(rendered, plot)
        title = spec["title"]["text"] if isinstance(spec["title"], dict) else spec["title"]
        assert title and "DVC_METRIC" not in title, plot
        titles = _axis_titles(spec)
        assert titles, plot
        for ch, t in titles:
            assert "(" in t and t not in ("step", "None", "y", "x") and "DVC_METRIC" not in t, (plot, ch, t)


def test_training_curves_one_plot_one_series_per_variant(rendered: dict[str, Any]) -> None:
    spec = _vega(rendered, "train_loss")
    assert spec["encoding"]["color"]["field"] == "variant"
    assert spec["encoding"]["x"]["field"] == "iter" and "iteration" in spec["encoding"]["x"]["title"]
    assert "loss" in spec["encoding"]["y"]["title"]
    assert {row["variant"] for row in spec["data"]["values"]} == set(MIOU)


def test_forest_plot_one_row_per_finding_and_the_paper_on_its_own_axis(rendered: dict[str, Any]) -> None:
    spec = _vega(rendered, "findings_forest")
    rows = spec["data"]["values"]
    reg = registry.load_registry()
    ran = [f for f in reg.findings if {f.a, f.b} <= set(MIOU)]
    assert len(rows) == len(ran) + 1  # + the compute-matched comparison of ours
    assert [r["a"] for r in rows[: len(ran)]] == [f.a for f in ran]
    assert "wall time" in rows[-1]["finding"] and "×" in rows[-1]["finding"]
    ours, theirs = spec["hconcat"]
    ours_x = {str(lay["encoding"]["x"].get("field")) for lay in ours["layer"] if "field" in lay["encoding"]["x"]}
    paper_x = {str(lay["encoding"]["x"].get("field")) for lay in theirs["layer"] if "field" in lay["encoding"]["x"]}
    assert ours_x == {"lo", "delta"} and paper_x == {"paper_dAPb"}  # two axes, never one
    assert any("x2" in lay["encoding"] for lay in ours["layer"])  # the CI is drawn


def test_paper_ap_never_shares_an_axis_with_our_metric() -> None:
    for plot in DVC_YAML["plots"]:
        if isinstance(plot, str):
            continue
        ((name, spec),) = plot.items()
        files = spec.get("y", {}) if isinstance(spec.get("y"), dict) else {}
        paper = [f for f in files if "paper" in f]
        assert not paper or len(files) == 1, name
