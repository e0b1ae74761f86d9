"""Sweep faults: secrets in storage URLs (B8, B9), the documented postgresql:// URL (B21), a sweep whose trials
all diverge (B18), and reproducibility by construction: the same trials, values and best under load, whatever
order the trials finish in, and a compute-matched schedule that no timing changes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from tests.test_sweep import data_root, micro  # noqa: F401 - the module fixture
from vit_adapter.sweep import SweepError, SweepSettings, main, plan_sweep, redact, run_sweep
from vit_adapter.sweep.batches import SLOT_ATTR, SlotPruner, next_trial, slots
from vit_adapter.sweep.locks import FileLock, WorkerLocks, _trial_lock_path
from vit_adapter.sweep.settings import scrub
from vit_adapter.sweep.storage import create_study, open_storage, storage_url

SECRETS = ("S3CRETPW", "SECRETPASSFILE", "SECRETKEY", "SECRETTOKEN")


def _no_secret_in(root: Path, *texts: str) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for secret in SECRETS:
                assert secret.encode() not in data, f"{secret} in {path}"
    for text in texts:
        for secret in SECRETS:
            assert secret not in text


def test_b8_secret_query_parameters_are_in_no_file_or_output(tmp_path, data_root, monkeypatch, capsys) -> None:  # noqa: F811
    monkeypatch.setenv("SWEEP_FAULT_TOKEN", "SECRETTOKEN")
    db = tmp_path / "optuna.db"
    # SQLite ignores these (with a warning); the sweep must still never store or print them.
    url = f"sqlite:///{db}?passfile=/home/u/SECRETPASSFILE&sslkey=/k/SECRETKEY&access_token=${{SWEEP_FAULT_TOKEN}}"
    settings = micro(data_root, tmp_path / "sweeps", n_trials=1, storage=url)
    summary = run_sweep(settings)
    recorded = json.loads((Path(summary["study_dir"]) / "settings.json").read_text())
    assert recorded["settings"]["storage"] == redact(url) and "passfile=***" in recorded["settings"]["storage"]
    assert "${SWEEP_FAULT_TOKEN}" in summary["storage"]  # a placeholder says where the token comes from
    out = capsys.readouterr()
    _no_secret_in(tmp_path / "sweeps", out.out, out.err)
    # A literal password in the query is refused like one in the user info, without printing it.
    with pytest.raises(SweepError, match="literal password") as err:
        SweepSettings(storage="postgresql://u@db/x?sslmode=require&password=S3CRETPW")
    assert "S3CRETPW" not in str(err.value)
    for text in ("x?password=S3CRETPW&a=1", "PGPASSWORD? no: sslpassword='S3CRETPW' host=h", "token=SECRETTOKEN"):
        assert not any(s in redact(text) for s in SECRETS)


def test_b8_postgresql_errors_do_not_print_query_secrets(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("SWEEP_FAULT_PW", "S3CRETPW")
    url = "postgresql://u@127.0.0.1:1/x?password=${SWEEP_FAULT_PW}&connect_timeout=2"  # port 1: refused
    assert main(["--storage", url, "--out-dir", str(tmp_path), "--report-only"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "S3CRETPW" not in err
    # Whatever a driver quotes of the filled URL is scrubbed.
    filled = "postgresql://u@h/x?password=S3CRETPW"
    assert "S3CRETPW" not in scrub(f'connect to "{filled}" failed; password S3CRETPW rejected', filled, url)


def test_b9_user_less_credentials_are_redacted(tmp_path, capsys) -> None:
    assert redact("postgresql://:S3CRETPW@db-host/x") == "postgresql://:***@db-host/x"
    with pytest.raises(SweepError, match="literal password") as err:
        SweepSettings(storage="postgresql://:S3CRETPW@db-host/x")
    assert "S3CRETPW" not in str(err.value)
    assert main(["--storage", "postgresql://:S3CRETPW@db-host/x", "--out-dir", str(tmp_path)]) == 2
    out = capsys.readouterr()
    assert "S3CRETPW" not in out.out + out.err and len(out.err.strip().splitlines()) == 1


def test_b21_documented_postgresql_url_uses_the_shipped_driver(tmp_path, data_root, capsys) -> None:  # noqa: F811
    for scheme in ("postgresql", "postgres"):
        settings = micro(data_root, tmp_path, storage=f"{scheme}://optuna@127.0.0.1:1/optuna?connect_timeout=2")
        assert storage_url(settings).startswith("postgresql+psycopg2://")
        with pytest.raises(SweepError) as err:  # nothing listens on port 1: a connection error, not a missing module
            open_storage(plan_sweep(settings))
        assert "No module named" not in str(err.value) and "psycopg'" not in str(err.value)
        assert "127.0.0.1" in str(err.value)
    explicit = micro(data_root, tmp_path, storage="postgresql+psycopg://u@h/x")
    assert storage_url(explicit) == "postgresql+psycopg://u@h/x"  # an explicit driver is kept


def test_b18_all_trials_diverge_one_line_exit_2(tmp_path, data_root, capsys) -> None:  # noqa: F811
    settings = micro(data_root, tmp_path / "sweeps", n_trials=2)
    argv = ["--out-dir", str(tmp_path / "sweeps"), "--n-trials", "2", "--pruner", "none", "--no-references"]
    argv += ["--no-plots"] + [x for s in [*settings.sets, "optim.lr=1e12"] for x in ("--set", s)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--no-resume" not in err
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith("sweep: error: 2 trial(s) diverged")
    assert "--set optim.lr=" in lines[0] and "loss is nan" in lines[0]


def _trials_of(settings: SweepSettings) -> list[tuple]:
    plan = plan_sweep(settings)
    study = optuna.load_study(study_name=plan.study_name, storage=open_storage(plan))
    return [
        (t.user_attrs[SLOT_ATTR], t.state.name, t.params, t.value, t.intermediate_values)
        for t in study.get_trials(deepcopy=False)
    ]


def test_rerun_under_load_gives_the_same_trials_and_best(tmp_path, data_root, monkeypatch) -> None:  # noqa: F811
    kw = dict(n_trials=4, pruner="median", prune_startup_trials=1, prune_warmup_evals=0, n_startup_trials=2)
    first = micro(data_root, tmp_path / "a", **kw)
    run_sweep(first)

    # The second run: a busy process on the cores (a thread would mostly take this process's GIL instead) and
    # clocks that jump by minutes between calls.
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    for name in ("time", "perf_counter", "monotonic"):
        real, jumps = getattr(time, name), iter(range(1, 10**9))
        monkeypatch.setattr(time, name, lambda real=real, jumps=jumps: real() + 300.0 * next(jumps))
    try:
        second = micro(data_root, tmp_path / "b", **kw)
        run_sweep(second)
    finally:
        monkeypatch.undo()
        busy.kill()
        busy.wait()
    assert _trials_of(first) == _trials_of(second)
    assert {t[1] for t in _trials_of(first)} >= {"COMPLETE"}
    a, b = (Path(plan_sweep(s).study_dir) / "best_params.json" for s in (first, second))
    assert a.read_bytes() == b.read_bytes()


def _finish(study: optuna.Study, number: int, values: dict[int, float]) -> None:
    trial = optuna.trial.Trial(study, study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number))
    for step, value in values.items():
        trial.report(value, step)
    study.tell(trial, values[max(values)])


def _interleaved(plan, order: tuple[int, int]) -> tuple[list[dict], list[bool]]:
    """Two "workers" take slots 0 and 1, finish them in `order`; then slots 2 and 3 are drawn, slot 2 finishes
    first (with a high value), and slot 3 asks whether to prune. Returns the params and the decisions."""
    storage = open_storage(plan)
    study = create_study(plan, storage)
    locks = WorkerLocks(FileLock(plan.study_dir / ".turnstile.lock"))
    locks.turnstile.acquire()
    held = []  # each "worker" holds its trial's lock, as the objective does: the trials are alive

    def take() -> int:
        assert next_trial(plan, study, locks, 0, None)
        trial = study.ask()
        trial.suggest_float("gamma_init", 1e-6, 1.0, log=True), trial.suggest_float("cffn_ratio", 1 / 16, 1.0)
        held.append(FileLock(_trial_lock_path(plan, trial.number)))
        held[-1].acquire()
        return trial.number

    for _ in range(2):
        take()
    values = {0: {1: 40.0, 2: 50.0}, 1: {1: 30.0, 2: 35.0}}
    for n in order:
        _finish(study, n, values[n])
    asked = [take(), take()]
    _finish(study, asked[0], {1: 90.0, 2: 95.0})  # a sibling in the same batch: must not change slot 3's pruning
    frozen = study._storage.get_trial(study._storage.get_trial_id_from_study_id_trial_number(study._study_id, 3))
    pruner = SlotPruner(plan, study, frozen, 3)
    decisions = [pruner.should_prune(1, 35.0), pruner.should_prune(2, 36.0)]
    locks.release_all()
    for lock in held:
        lock.release()
    by_slot = slots(study)
    return [by_slot[k][-1].params for k in range(4)], decisions


def test_trials_do_not_depend_on_completion_order(tmp_path, data_root) -> None:  # noqa: F811
    kw = dict(n_trials=4, pruner="median", prune_startup_trials=1, prune_warmup_evals=0, n_startup_trials=1)
    a = _interleaved(plan_sweep(micro(data_root, tmp_path / "a", **kw)), (0, 1))
    b = _interleaved(plan_sweep(micro(data_root, tmp_path / "b", **kw)), (1, 0))
    assert a == b
    assert a[1] == [False, True]  # 36 < median(50, 35) of batch 0 at step 2; slot 2's 95 is not seen


def test_compute_matched_iterations_come_from_the_recorded_ratio(tmp_path, monkeypatch) -> None:
    from vit_adapter import pipeline

    params = pipeline.load_params()
    ratio_file = tmp_path / "compute_matched.json"
    ratio_file.write_text(
        json.dumps({"profiles": {params.get("profile", "cpu_default"): {"full_over_baseline": 2.0, "measured": "t"}}})
    )
    configs = []
    for s_per_iter in (0.2, 5.0):  # live timings that differ 25x: a loaded machine
        runs = tmp_path / f"runs{s_per_iter}"
        for variant, f in (("full", 1.0), ("baseline", 0.5)):
            for s in params.get("seeds", [0]):
                d = runs / variant / f"s{s}"
                d.mkdir(parents=True)
                costs = {"train_s_per_iter": s_per_iter * f * (1 + s), "flops_backbone_forward": 10 + s}
                (d / "costs.json").write_text(json.dumps(costs))
        recorded = pipeline.cost_ratio(params, runs, ratio_file)
        assert recorded["ratio"] == 2.0 and "compute_matched.json" in recorded["source"]
        jobs = pipeline.compute_matched_jobs(params, runs, recorded["ratio"])
        configs.append([(cfg.train.max_iters, cfg.train.eval_interval, cfg.optim.milestones) for cfg, _ in jobs])
    assert (
        configs[0] == configs[1]
        and configs[0][0][0] == 2 * pipeline.variant_config(params, "baseline_compute_matched", 0).train.max_iters
    )
    # Without a recorded ratio: the deterministic FLOPs ratio, said so.
    flops = pipeline.cost_ratio(params, tmp_path / "runs0.2", tmp_path / "missing.json")
    assert flops["ratio"] == 1.0 and "FLOPs" in flops["source"]
    # The committed measurement reproduces the committed schedule.
    committed = pipeline.cost_ratio(params, pipeline.REPO / "results" / "runs")
    schedule = json.loads((pipeline.REPO / "results/runs/baseline_compute_matched/schedule.json").read_text())
    assert committed["ratio"] == schedule["time_ratio_full_over_baseline"]
