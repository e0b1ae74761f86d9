"""The sweep on a real PostgreSQL server: two worker processes standing in for two machines (separate output
directories, one study in one database), a worker SIGKILLed mid-trial and found through Optuna's heartbeat, the
exact trial budget, no password in any output, and the export into the journal that `dvc repro` reports from.

The server is a throw-away cluster (initdb in a temp dir, loopback only, a random password), started once per
module and removed afterwards. Skipped only where the PostgreSQL server binaries are missing (`make setup`
installs them when run as root)."""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from tests.test_sweep import micro
from vit_adapter.analysis.report_sections import section_sweeps as _section_sweeps
from vit_adapter.data import generate_dataset
from vit_adapter.sweep import SweepSettings, main, plan_sweep, run_sweep, write_outputs
from vit_adapter.sweep.locks import AdvisoryLock
from vit_adapter.sweep.settings import KILL_ENV
from vit_adapter.sweep.storage import open_storage, storage_url

REPO = Path(__file__).resolve().parents[1]
PASSWORD_ENV = "VIT_ADAPTER_TEST_PGPASSWORD"  # the URL carries only the placeholder ${VIT_ADAPTER_TEST_PGPASSWORD}


def _server_bin() -> Path | None:
    """The newest Debian PostgreSQL bin dir with initdb and pg_ctl (they are not on PATH there), else PATH's."""
    for bindir in sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: p.parent.name, reverse=True):
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return bindir
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def postgres() -> Iterator[dict[str, object]]:
    bindir = _server_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found; `make setup` as root installs them")
    base = Path(tempfile.mkdtemp(prefix="vit-adapter-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root: run it as the package's `postgres` user
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(base)
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        os.chown(base, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    password = secrets.token_hex(16)
    pwfile = base / "pwfile"
    pwfile.write_text(password + "\n", encoding="utf-8")
    if as_user:
        os.chown(pwfile, owner.pw_uid, owner.pw_gid)
    data, port = base / "data", _free_port()
    initdb = [str(bindir / "initdb"), "-D", str(data), "-U", "optuna", f"--pwfile={pwfile}", "-A", "scram-sha-256"]
    subprocess.run([*as_user, *initdb, "-E", "UTF8", "--locale=C", "--no-sync"], check=True, capture_output=True)
    pwfile.unlink()
    # Loopback TCP only, the Unix socket inside the temp dir; fsync off: the cluster is thrown away.
    opts = f"-k {base} -h 127.0.0.1 -p {port} -c fsync=off -c full_page_writes=off"
    pg_ctl = [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-w", "-t", "60"]
    subprocess.run([*pg_ctl, "-l", str(base / "server.log"), "-o", opts, "start"], check=True, capture_output=True)
    try:
        yield {"host": "127.0.0.1", "port": port, "user": "optuna", "password": password, "db": "postgres"}
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "gen"
    generate_dataset(root, n_train=8, n_val=4, image_size=64, seed=0, objects_per_image=(2, 3))
    return root


def _url(pg: dict[str, object]) -> str:
    return f"postgresql+psycopg2://{pg['user']}:${{{PASSWORD_ENV}}}@{pg['host']}:{pg['port']}/{pg['db']}"


def _files_containing(root: Path, needle: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


@pytest.mark.slow  # two worker subprocesses (each imports torch); ~1 min on one thread
def test_two_machines_one_postgres_study_kill_retry_exact_budget(tmp_path, data_root, postgres, monkeypatch) -> None:
    password = str(postgres["password"])
    url = _url(postgres)
    # Heartbeat every second, stale after 5 s without one (a margin for a loaded CI machine), so the killed
    # worker's trial is retried within seconds.
    base = micro(data_root, tmp_path / "unused", n_trials=3, storage=url, heartbeat_s=1, heartbeat_grace_s=5)
    keys = ("sets", "n_trials", "storage", "heartbeat_s", "heartbeat_grace_s", "pruner", "references", "plots")
    machines = {name: tmp_path / name for name in ("A", "B")}  # separate dirs: nothing shared but the database
    params: dict[str, Path] = {}
    for name, root in machines.items():
        params[name] = tmp_path / f"params_{name}.yaml"
        sweep = {k: getattr(base, k) for k in keys} | {"out_dir": str(root / "sweeps")}
        params[name].write_text(yaml.safe_dump({"sweep": sweep}), encoding="utf-8")
    assert password not in params["A"].read_text()  # the params file holds the placeholder only

    monkeypatch.setenv(PASSWORD_ENV, password)
    settings = SweepSettings(**(vars(base) | {"out_dir": str(machines["A"] / "sweeps")}))
    plan = plan_sweep(settings)
    # Whichever worker runs trial 1 SIGKILLs itself after that trial's first iteration (and its checkpoint).
    env = os.environ | {KILL_ENV: "1:1", PASSWORD_ENV: password, "OMP_NUM_THREADS": "1"}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "vit_adapter.sweep", "--params", str(p)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, p in params.items()
    }
    outputs = {name: proc.communicate(timeout=400) for name, proc in procs.items()}
    codes = {name: proc.returncode for name, proc in procs.items()}
    assert sorted(codes.values()) == [-signal.SIGKILL, 0], {n: (codes[n], outputs[n][1][-1500:]) for n in procs}
    survivor = next(n for n, c in codes.items() if c == 0)
    result = json.loads(outputs[survivor][0].strip().splitlines()[-1])
    assert result["status"] == "done" and result["study"] == plan.study_name  # same identity in every process
    settings = SweepSettings(**(vars(settings) | {"out_dir": str(machines[survivor] / "sweeps")}))
    study = optuna.load_study(study_name=plan.study_name, storage=open_storage(plan))
    trials = study.get_trials(deepcopy=False)
    by_state = {st: [t for t in trials if t.state == st] for st in TrialState}
    # The exact budget: 3 trials COMPLETE, the killed one FAIL (interrupted: no divergence reason), nothing else.
    assert len(by_state[TrialState.COMPLETE]) == 3 and len(trials) == 4, [(t.number, t.state) for t in trials]
    (killed,) = by_state[TrialState.FAIL]
    assert killed.number == 1 and "failure" not in killed.user_attrs
    (retry,) = [t for t in trials if "failed_trial" in t.system_attrs]
    assert retry.system_attrs["failed_trial"] == 1 and retry.params == killed.params
    # The retry keeps the killed trial's slot and comes before the next batch's slot 2 (batches of 2: slot 2 waits
    # until slots 0 and 1 are finished).
    assert retry.user_attrs["slot"] == killed.user_attrs["slot"] == 1 and retry.number == 2
    assert 1 in retry.intermediate_values  # inherited from the killed trial (RetryHeartbeatStaleTrialCallback)
    # Distinct trials: three sampled points (the retry repeats the killed one's), run by both workers.
    sampled = [t for t in trials if "failed_trial" not in t.system_attrs]
    assert len({(t.params["gamma_init"], t.params["cffn_ratio"]) for t in sampled}) == 3
    assert len({t.user_attrs["worker"] for t in trials}) == 2
    # The killed trial was detected through the heartbeat (RDB storage: no file lock is ever consulted).
    import sqlalchemy

    engine = sqlalchemy.create_engine(storage_url(settings), poolclass=sqlalchemy.pool.NullPool)
    with engine.connect() as conn:
        beats = conn.execute(
            sqlalchemy.text("SELECT count(*) FROM trial_heartbeats WHERE trial_id = :t"), {"t": killed._trial_id}
        ).scalar()
    engine.dispose()
    assert beats == 1

    # The outputs from PostgreSQL (on a third machine) and from the exported journal are the same.
    from_pg = write_outputs(SweepSettings(**(vars(settings) | {"out_dir": str(tmp_path / "C" / "sweeps")})))
    assert main(["--params", str(params[survivor]), "--export"]) == 0
    sweeps_pg, sweeps_journal = tmp_path / "C" / "sweeps", machines[survivor] / "sweeps"
    study_pg, study_journal = sweeps_pg / plan.study_name, sweeps_journal / plan.study_name
    assert (study_journal / "journal.log").is_file() and not (study_pg / "journal.log").exists()
    for name in ("best_params.json", "trials.csv"):
        assert (study_pg / name).read_bytes() == (study_journal / name).read_bytes(), name
    from_journal = json.loads((study_journal / "summary.json").read_text())
    assert from_journal["storage"].endswith("journal.log") and from_pg["storage"] == url
    for key in ("counts", "best", "status", "study_name", "inputs", "identity"):
        assert from_journal[key] == from_pg[key], key

    def section(sweeps: Path) -> list[str]:
        return [re.sub(r"Storage: `[^`]*`", "Storage: `…`", line) for line in _section_sweeps(sweeps, sweeps)]

    assert section(sweeps_pg) == section(sweeps_journal)
    assert any("3 complete" in line for line in section(sweeps_journal))

    # No credential anywhere: every file the run wrote (both machines, the report-only one) and the workers' output.
    def leaks() -> list[Path]:
        return [
            p for root in (tmp_path / "A", tmp_path / "B", tmp_path / "C") for p in _files_containing(root, password)
        ]

    assert leaks() == []
    assert all(password not in out and password not in err for out, err in outputs.values())
    for root in machines.values():  # what the settings record is the placeholder, naming where the password is
        (path,) = root.rglob("settings.json")
        assert f"${{{PASSWORD_ENV}}}" in path.read_text(), path

    # What `dvc repro` then does (storage: null): finds the exported study done, trains nothing, reports it.
    local = SweepSettings(**(vars(settings) | {"storage": None}))
    summary = run_sweep(local)
    assert summary["status"] == "done" and summary["counts"] == from_pg["counts"]
    assert len(optuna.load_study(study_name=plan.study_name, storage=open_storage(plan_sweep(local))).trials) == 4
    assert leaks() == []


def test_advisory_turnstile_is_exclusive_and_freed_with_its_connection(postgres, monkeypatch) -> None:
    monkeypatch.setenv(PASSWORD_ENV, str(postgres["password"]))
    url = storage_url(SweepSettings(storage=_url(postgres)))
    first, second = AdvisoryLock(url, "study-x"), AdvisoryLock(url, "study-x")
    other = AdvisoryLock(url, "study-y")
    try:
        assert first.acquire() and not second.acquire(blocking=False)  # one holder per study, across connections
        assert other.acquire(blocking=False)  # another study's turnstile is independent
        first.close()  # the connection ends (as when its worker dies): the server drops the lock
        assert second.acquire(blocking=False)
    finally:
        for lock in (first, second, other):
            lock.close()
    # The documented alternative to a placeholder: no password in the URL at all, libpq reads PGPASSWORD.
    monkeypatch.setenv("PGPASSWORD", str(postgres["password"]))
    bare = f"postgresql+psycopg2://{postgres['user']}@{postgres['host']}:{postgres['port']}/{postgres['db']}"
    plain = AdvisoryLock(storage_url(SweepSettings(storage=bare)), "study-x")
    try:
        assert plain.acquire(blocking=False)
    finally:
        plain.close()


def test_bad_credentials_are_one_line_without_the_password(tmp_path, data_root, postgres, monkeypatch, capsys) -> None:
    wrong = "not-the-" + secrets.token_hex(8)
    monkeypatch.setenv(PASSWORD_ENV, wrong)
    args = ["--storage", _url(postgres), "--out-dir", str(tmp_path), "--no-references", "--no-plots"]
    args += [x for s in micro(data_root, tmp_path).sets for x in ("--set", s)]
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert err.startswith("sweep: error: cannot open storage ") and len(err.strip().splitlines()) == 1, err
    assert "password authentication failed" in err and wrong not in out + err
    assert f"${{{PASSWORD_ENV}}}" in err  # names where the password came from
