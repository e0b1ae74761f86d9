"""The γ-init × ConvFFN-ratio Optuna sweep on tiny generated data: end to end, kill -9 and resume, two workers on
one journal, pruning (on an RDB storage), and the settings that name a study."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from tests.test_engine import tiny_sets
from vit_adapter.data import generate_dataset
from vit_adapter.engine.identity import sha256_file
from vit_adapter.engine.rundir import reuse_or_reset
from vit_adapter.sweep import (
    REFERENCE_POINTS,
    SweepError,
    SweepSettings,
    add_sweep_args,
    export_study,
    main,
    plan_sweep,
    redact,
    run_sweep,
    settings_from_args,
    settings_from_mapping,
)
from vit_adapter.sweep.settings import KILL_ENV
from vit_adapter.sweep.storage import create_study, open_storage, storage_url

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "gen"
    generate_dataset(root, n_train=8, n_val=4, image_size=64, seed=0, objects_per_image=(2, 3))
    return root


def micro(root: Path, out: Path, **kw) -> SweepSettings:
    """A seg sweep whose trials train 2 iterations, evaluating and checkpointing after each."""
    sets = tiny_sets(root, "seg", iters=2, extra=["train.eval_interval=1", "train.checkpoint_interval=1"])
    base = dict(sets=sets, out_dir=str(out), n_trials=3, pruner="none", references=False, plots=False)
    return SweepSettings(**(base | kw))


def load(settings: SweepSettings) -> optuna.Study:
    plan = plan_sweep(settings)
    return optuna.load_study(study_name=plan.study_name, storage=open_storage(plan))


def states(study: optuna.Study) -> dict[int, TrialState]:
    return {t.number: t.state for t in study.get_trials(deepcopy=False)}


def test_micro_sweep_end_to_end(tmp_path, data_root) -> None:
    settings = micro(data_root, tmp_path / "sweeps", references=True, plots=True)
    summary = run_sweep(settings)
    d = Path(summary["study_dir"])
    assert d.parent == tmp_path / "sweeps" and (d / "journal.log").is_file()
    study = load(settings)
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    for t in trials:  # both parameters in every trial, inside the search space
        assert 1e-6 <= t.params["gamma_init"] <= 1 and 1 / 16 <= t.params["cffn_ratio"] <= 1
        assert t.value == t.user_attrs["mIoU_seed0"] and 0 <= t.value <= 100
        assert sorted(t.intermediate_values) == [1, 2]  # both evaluations were reported
        assert (d / "trials" / f"trial_{t.number:04d}" / "seed_0" / "metrics.json").is_file()
    cfg = yaml.safe_load((d / "trials" / "trial_0000" / "seed_0" / "config.yaml").read_text())
    assert cfg["model"]["gamma_init"] == trials[0].params["gamma_init"] and cfg["model"]["with_cffn"] is True

    assert summary["counts"]["complete"] == 3 and summary["status"] == "done" and summary["metric"] == "mIoU"
    best = json.loads((d / "best_params.json").read_text())["best"]
    assert best["trial"] == study.best_trial.number and best["params"] == study.best_params
    refs = json.loads((d / "reference_points.json").read_text())["points"]
    assert set(refs) == set(REFERENCE_POINTS) and refs["paper_default"]["params"]["gamma_init"] == 0.0
    for name, ref in refs.items():  # per-seed values come from the reference runs' own metrics
        metrics = json.loads((d / "reference" / name / "seed_0" / "metrics.json").read_text())
        assert ref["per_seed"] == {"0": metrics["final"]["mIoU"]}
        delta = summary["best_vs_references"][name]["per_seed_delta"]["0"]
        assert delta == pytest.approx(best["per_seed"]["0"] - ref["per_seed"]["0"])
    no_cffn = yaml.safe_load((d / "reference" / "no_cffn" / "seed_0" / "config.yaml").read_text())
    assert no_cffn["model"]["with_cffn"] is False
    csv = (d / "trials.csv").read_text().splitlines()
    assert len(csv) == 4 and "params_gamma_init" in csv[0] and "params_cffn_ratio" in csv[0]
    for name in ("optimization_history", "contour_gamma_ratio", "param_importances", "slice"):
        png = d / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert json.loads((tmp_path / "sweeps" / "summary.json").read_text()) == json.loads(
        (d / "summary.json").read_text()
    )
    # A rerun that only reloads the finished study (DVC after a comment edit) keeps the study's wall time.
    again = run_sweep(settings)
    assert again["wall_s"] == summary["wall_s"] > 0 and again["counts"] == summary["counts"]

    # A rerun finds the study complete and the references cached: nothing is trained again.
    stamp = (d / "reference" / "no_cffn" / "seed_0" / "metrics.json").stat().st_mtime_ns
    again = run_sweep(dataclasses.replace(settings, plots=False))
    assert again["counts"]["complete"] == 3 and len(load(settings).trials) == 3
    assert (d / "reference" / "no_cffn" / "seed_0" / "metrics.json").stat().st_mtime_ns == stamp


@pytest.mark.slow  # one subprocess (imports torch)
def test_kill_9_mid_sweep_then_resume(tmp_path, data_root) -> None:
    settings = micro(data_root, tmp_path / "sweeps")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"sweep": {k: getattr(settings, k) for k in ("sets", "out_dir", "n_trials")}}))
    # The worker SIGKILLs itself after iteration 1 of trial 1 (after that iteration's checkpoint).
    env = os.environ | {KILL_ENV: "1:1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "vit_adapter.sweep", "--params", str(params), "--pruner", "none", "--no-references"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    study = load(settings)
    assert states(study) == {0: TrialState.COMPLETE, 1: TrialState.RUNNING}  # the journal still says running
    d = plan_sweep(settings).study_dir
    done0 = d / "trials" / "trial_0000" / "seed_0" / "metrics.json"
    stamp = done0.stat().st_mtime_ns
    assert (d / "trials" / "trial_0001" / "seed_0.partial" / "checkpoints").is_dir()

    run_sweep(settings)  # the same settings: resumes the study
    study = load(settings)
    trials = study.get_trials(deepcopy=False)
    assert trials[0].state == TrialState.COMPLETE and done0.stat().st_mtime_ns == stamp  # kept, not retrained
    assert trials[1].state == TrialState.FAIL  # the interrupted trial
    retry = trials[2]  # queued by the recovery before any new trial
    assert retry.state == TrialState.COMPLETE and retry.system_attrs["failed_trial"] == 1
    assert retry.params == trials[1].params and 1 in retry.intermediate_values
    run = d / "trials" / "trial_0001" / "seed_0"  # the retry reused the original's run directory ...
    assert json.loads((run / "run.json").read_text())["resumed_from_iteration"] == 1  # ... and its checkpoint
    assert len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == settings.n_trials
    assert not list(d.glob("trials/*/*.partial"))


@pytest.mark.slow  # two spawned workers (each imports torch)
def test_two_workers_share_one_journal(tmp_path, data_root) -> None:
    settings = micro(data_root, tmp_path / "sweeps", n_trials=3, n_workers=2)  # odd: both want the last slot
    summary = run_sweep(settings)
    trials = load(settings).get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3  # exactly n_trials, nothing failed
    assert len({(t.params["gamma_init"], t.params["cffn_ratio"]) for t in trials}) == 3
    assert len({t.user_attrs["run_dir"] for t in trials}) == 3
    workers = {t.user_attrs["worker"] for t in trials}
    assert len(workers) == 2 and not any(w.endswith(f":{os.getpid()}") for w in workers)  # two child processes
    assert summary["counts"]["complete"] == 3


def test_pruned_trial_is_recorded_as_pruned_on_rdb_storage(tmp_path, data_root) -> None:
    # mIoU is a percentage, so "prune below 101" prunes at the first report: a deterministic prune.
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    kw = dict(n_trials=1, storage=url, pruner="threshold", prune_below=101.0, prune_warmup_evals=0)
    settings = micro(data_root, tmp_path / "sweeps", **kw)
    summary = run_sweep(settings)
    (trial,) = load(settings).get_trials(deepcopy=False)
    assert trial.state == TrialState.PRUNED and list(trial.intermediate_values) == [1]
    d = Path(summary["study_dir"])
    assert not (d / "journal.log").exists() and not list(d.glob("trials/*/*.partial"))  # nothing to resume
    assert summary["counts"]["pruned"] == 1 and summary["status"] == "done" and summary["best"] is None
    assert (d / "trials.csv").read_text().splitlines()[1].split(",")[2] == "PRUNED"


def test_diverging_trials_fail_without_retry_and_are_capped(tmp_path, data_root) -> None:
    # lr = 1e12 makes the loss NaN at iteration 2 whatever γ and the ratio: every trial diverges.
    settings = micro(data_root, tmp_path / "sweeps", n_trials=2, max_failed=1)
    settings.sets = [*settings.sets, "optim.lr=1e12"]
    summary = run_sweep(settings)
    (trial,) = load(settings).get_trials(deepcopy=False)  # stopped by the cap; no retry was queued
    assert trial.state == TrialState.FAIL and "loss is nan" in trial.user_attrs["failure"]
    assert summary["status"] == "too_many_failures" and summary["counts"]["fail"] == 1
    assert not list(Path(summary["study_dir"]).glob("trials/*/*.partial"))


def test_study_name_follows_the_objective_and_settings_are_checked(tmp_path, data_root) -> None:
    base = micro(data_root, tmp_path)
    name = plan_sweep(base).study_name
    assert name.startswith("gamma-cffn-seg-mIoU-")
    # Budget and execution settings decide neither the objective nor the trials: same study, so they resume it.
    same = micro(data_root, tmp_path, n_trials=50, n_workers=2, timeout_s=10.0)
    assert plan_sweep(same).study_name == name
    for changed in (
        micro(data_root, tmp_path, seeds=[0, 1]),
        micro(data_root, tmp_path, sets=[*base.sets, "optim.lr=2e-3"]),
        micro(data_root, tmp_path, metric="mAcc"),
        micro(data_root, tmp_path, pruner="median"),  # what decides the trials is in the identity too
        micro(data_root, tmp_path, sampler_seed=1),
        micro(data_root, tmp_path, batch_size=3),
    ):
        assert plan_sweep(changed).study_name != name
    det = plan_sweep(SweepSettings(sets=tiny_sets(data_root, "det")))
    assert det.metric == "bbox_mAP"
    with pytest.raises(SweepError, match="model.gamma_init"):
        micro(data_root, tmp_path, sets=["model.gamma_init=0.5"])
    with pytest.raises(SweepError, match="unknown sweep setting"):
        settings_from_mapping({"n_trail": 3})
    with pytest.raises(SweepError, match="n_trials"):
        settings_from_mapping({"n_trials": 0})

    # CLI: flags override the params file; --set adds to its sets.
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"sweep": {"n_trials": 20, "seeds": [0, 1], "sets": ["optim.lr=1e-3"]}}))
    import argparse

    args = add_sweep_args(argparse.ArgumentParser()).parse_args(
        ["--params", str(params), "--n-trials", "5", "--set", "train.max_iters=7", "--seeds", "3,4"]
    )
    s = settings_from_args(args)
    assert (s.n_trials, s.seeds, s.sets) == (5, [3, 4], ["optim.lr=1e-3", "train.max_iters=7"])


def test_budget_scales_the_schedule(tmp_path, data_root) -> None:
    # The study identity digests the data and weights, so the plan needs them: tiny data, no pretrained weights.
    inputs = [f"data.root={data_root}", "weights.init=scratch"]
    plan = plan_sweep(SweepSettings(max_iters=200, out_dir=str(tmp_path), sets=inputs))
    cfg = plan.config(0, {"gamma_init": 1e-3, "cffn_ratio": 0.5, "with_cffn": True})
    full = plan_sweep(SweepSettings(out_dir=str(tmp_path), sets=inputs)).config(0, {})
    assert cfg.train.max_iters == 200 and cfg.train.eval_interval == 50 == plan.eval_interval
    assert plan_sweep(SweepSettings(max_iters=150, out_dir=str(tmp_path), sets=inputs)).eval_interval == 38
    scale = 200 / full.train.max_iters
    assert cfg.optim.milestones == [round(m * scale) for m in full.optim.milestones if round(m * scale) < 200]
    assert cfg.model.gamma_init == 1e-3 and cfg.train.threads == 1


def _write_weights(cfg, src: Path, out: Path, seed: int) -> None:
    """A .safetensors (+ sidecar) for the tiny model's ViT, drawn from `seed`, at `out` (replaced if present)."""
    import torch

    from vit_adapter.engine.build import backbone_of, build_model
    from vit_adapter.engine.weights import fetch_weights

    torch.manual_seed(seed)
    torch.save(backbone_of(build_model(cfg)).vit.state_dict(), src)
    fetch_weights(str(src), out)


def test_changed_weights_at_the_same_path_start_a_new_study(tmp_path, data_root) -> None:
    weights = tmp_path / "weights" / "vit.safetensors"
    settings = micro(data_root, tmp_path / "sweeps", n_trials=1)
    settings.sets = [*settings.sets, "weights.init=pretrained", f"weights.source={weights}"]
    scratch = plan_sweep(micro(data_root, tmp_path / "sweeps", n_trials=1))
    _write_weights(scratch.config(0, {}), tmp_path / "a.pth", weights, seed=1)
    first = run_sweep(settings)
    assert first["inputs"]["weights"] == sha256_file(weights) and first["inputs"] == first["objective"]["inputs"]
    recorded = json.loads((Path(first["study_dir"]) / "settings.json").read_text())
    assert recorded["inputs"] == first["inputs"] and recorded["identity"] == first["identity"]
    assert recorded["identity"].startswith(first["study_name"].rsplit("-", 1)[1])  # the name carries the identity
    run0 = Path(first["study_dir"]) / "trials" / "trial_0000" / "seed_0"
    stamp = (run0 / "metrics.json").stat().st_mtime_ns

    _write_weights(scratch.config(0, {}), tmp_path / "b.pth", weights, seed=2)  # other bytes, the same path
    second = run_sweep(settings)
    assert second["study_name"] != first["study_name"] and second["inputs"]["weights"] == sha256_file(weights)
    assert {k: v for k, v in second["inputs"].items() if k != "weights"} == {
        k: v for k, v in first["inputs"].items() if k != "weights"
    }
    # No trial reused: the new study trained its own trial; the old study and its run are untouched.
    assert second["counts"]["complete"] == 1 and len(load(settings).trials) == 1
    run1 = Path(second["study_dir"]) / "trials" / "trial_0000" / "seed_0"
    assert json.loads((run1 / "run.json").read_text())["resumed_from_iteration"] == 0
    assert (run0 / "metrics.json").stat().st_mtime_ns == stamp
    # An explicit study name cannot reuse the old study for the new inputs either.
    with pytest.raises(SweepError, match="another objective"):
        run_sweep(dataclasses.replace(settings, study_name=first["study_name"]))


def test_a_run_trained_for_another_identity_is_not_reused(tmp_path) -> None:
    run = tmp_path / "trial_0000" / "seed_0"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text("{}")
    (tmp_path / "trial_0000" / "seed_0.partial").mkdir()
    reuse_or_reset(run, "new", record=True)  # no marker: trained by something that did not record its identity
    assert not run.exists() and not run.with_name("seed_0.partial").exists()
    assert (tmp_path / "trial_0000" / "seed_0.identity").read_text().strip() == "new"
    run.mkdir()
    (run / "metrics.json").write_text("{}")
    reuse_or_reset(run, "new", record=True)  # the same identity: kept
    assert (run / "metrics.json").is_file()
    reuse_or_reset(run, "other", record=True)  # changed config or inputs: discarded
    assert not run.exists()


def test_storage_credentials_come_from_the_environment(tmp_path, monkeypatch, capsys) -> None:
    with pytest.raises(SweepError, match="literal password") as err:
        SweepSettings(storage="postgresql://optuna:s3cret@db-host/optuna")
    assert "s3cret" not in str(err.value)
    url = "postgresql://optuna:${SWEEP_TEST_PW}@db-host:5432/optuna"
    settings = SweepSettings(storage=url)  # a placeholder is fine
    monkeypatch.delenv("SWEEP_TEST_PW", raising=False)
    with pytest.raises(SweepError, match="SWEEP_TEST_PW is not set"):
        storage_url(settings)
    monkeypatch.setenv("SWEEP_TEST_PW", "p/w@x")
    assert storage_url(settings) == "postgresql+psycopg2://optuna:p/w@x@db-host:5432/optuna"  # the shipped driver
    assert storage_url(SweepSettings(storage="${SWEEP_TEST_PW}")) == "p/w@x"  # the whole URL from one variable
    assert redact("postgresql://optuna:p/w@x@db-host/optuna") == "postgresql://optuna:***@db-host/optuna"
    assert redact(url) == url and redact("sqlite:///x.db") == "sqlite:///x.db"
    # The CLI: one line naming the problem, exit 2, and no password in what it prints.
    assert main(["--storage", "postgresql://optuna:s3cret@db-host/optuna", "--out-dir", str(tmp_path)]) == 2
    out, errtext = capsys.readouterr()
    assert "literal password" in errtext and len(errtext.strip().splitlines()) == 1 and "s3cret" not in out + errtext
    assert main(["--report-only", "--export", "--out-dir", str(tmp_path)]) == 2
    assert "exclude each other" in capsys.readouterr().err


def test_export_needs_an_rdb_and_a_finished_study(tmp_path, data_root, capsys) -> None:
    with pytest.raises(SweepError, match="RDB"):
        export_study(micro(data_root, tmp_path / "sweeps"))
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    settings = micro(data_root, tmp_path / "sweeps", n_trials=1, storage=url)
    with pytest.raises(SweepError, match="run the sweep first"):
        export_study(settings)
    plan = plan_sweep(settings)
    study = create_study(plan, open_storage(plan))
    with pytest.warns(UserWarning, match="Heartbeat"):  # Optuna: a heartbeat storage outside optimize()
        study.ask()  # a trial left RUNNING: its copy would look interrupted to the journal's liveness check
    with pytest.raises(SweepError, match=r"unfinished trials \[0\]"):
        export_study(settings)
    assert not plan.journal_path.exists()
