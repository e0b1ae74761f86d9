"""The sweep's outputs, from the storage alone: trials.csv, best_params.json, plots, summary.json; and the export
of a finished RDB study into the journal file the DVC stage reads."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from ..utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from .plan import Plan, _plan_info, plan_sweep
from .settings import FAILURE_ATTR, GAMMA, RATIO, SweepError, SweepSettings, redact
from .storage import open_storage

log = logging.getLogger(__package__)  # "vit_adapter.sweep", as before the split


def load_existing_study(plan: Plan, storage: optuna.storages.BaseStorage) -> optuna.Study:
    """The plan's study from `storage`; a one-line SweepError (storage URL redacted) when it is not there."""
    try:
        return optuna.load_study(study_name=plan.study_name, storage=storage)
    except KeyError as err:
        where = redact(plan.settings.storage)
        raise SweepError(f"no study {plan.study_name!r} in {where}; run the sweep first") from err


def write_outputs(settings: SweepSettings, wall_s: float | None = None) -> dict[str, Any]:
    """trials.csv, best_params.json, plots/*.png, summary.json from the storage (+ reference_points.json).

    Reads only the storage and the reference runs, so it works on a machine that ran none of the trials."""
    plan = plan_sweep(settings)
    study = load_existing_study(plan, open_storage(plan, create=False))
    d = plan.study_dir
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]

    df = study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs", "duration"))
    df = df.map(lambda v: json.dumps(v, sort_keys=True) if isinstance(v, dict) else v)  # CSV cells, not reprs
    atomic_write_text(d / "trials.csv", df.to_csv(index=False))

    best: dict[str, Any] | None = None
    if complete:
        b = study.best_trial
        best = {
            "trial": b.number,
            "value": b.value,
            "params": dict(b.params),
            "per_seed": {str(s): b.user_attrs.get(f"{plan.metric}_seed{s}") for s in settings.seeds},
            "final_per_seed": {str(s): b.user_attrs.get(f"final_seed{s}") for s in settings.seeds},
        }
    atomic_write_json(d / "best_params.json", {"study_name": plan.study_name, "metric": plan.metric, "best": best})

    ref_path = d / "reference_points.json"
    refs = json.loads(ref_path.read_text(encoding="utf-8"))["points"] if ref_path.is_file() else {}
    comparison: dict[str, Any] = {}
    for name, ref in refs.items():
        if best is None:
            break
        deltas = {
            s: (best["per_seed"][s] - v) if best["per_seed"].get(s) is not None and v is not None else None
            for s, v in ref["per_seed"].items()
        }
        known = [v for v in deltas.values() if v is not None]
        comparison[name] = {
            "per_seed_delta": deltas,
            "mean_delta": sum(known) / len(known) if known and len(known) == len(deltas) else None,
            "best_wins_on_seeds": sum(v > 0 for v in known),
        }

    plots, skipped = _write_plots(plan, study, len(complete)) if settings.plots else ([], {"all": "plots: false"})
    counts = {st.name.lower(): sum(t.state == st for t in trials) for st in TrialState}
    failures = [
        t.user_attrs[FAILURE_ATTR] for t in trials if t.state == TrialState.FAIL and FAILURE_ATTR in t.user_attrs
    ]
    diverged = len(failures)
    if counts["complete"] + counts["pruned"] >= settings.n_trials:
        status = "done"
    elif diverged >= (settings.max_failed or settings.n_trials):
        status = "too_many_failures"
    else:
        status = "incomplete"  # time budget spent, or workers still running elsewhere
    summary = {
        **_plan_info(plan),
        "seeds": list(settings.seeds),
        "n_trials_target": settings.n_trials,
        "status": status,
        "counts": counts,
        "failure_example": failures[0] if failures else None,
        "search_space": {GAMMA: {"low": 1e-6, "high": 1.0, "log": True}, RATIO: {"low": 1 / 16, "high": 1.0}},
        "best": best,
        "references": refs,
        "best_vs_references": comparison,
        "importances": _importances(study) if len(complete) >= 2 else None,
        "plots": plots,
        "plots_skipped": skipped,
        "wall_s": wall_s,
        "note": "the best point is selected on the same validation seeds it is compared on (optimistic); "
        "confirm it on fresh seeds before claiming an improvement over the paper default",
    }
    atomic_write_json(d / "summary.json", summary)
    atomic_write_json(Path(settings.out_dir) / "summary.json", summary)  # the latest sweep, at a fixed path
    return summary


def export_study(settings: SweepSettings) -> dict[str, Any]:
    """Copy a finished study out of its RDB storage into the journal file `<out_dir>/<study>/journal.log`, the
    storage a sweep with `storage: null` (the DVC stage) reads, then write the outputs from that journal; returns
    summary.json's content. The study name is the same on both sides (the storage is not part of it), so a later
    `vit-adapter sweep --params params.yaml` finds the study done and only reports it."""
    from optuna.storages.journal import JournalFileBackend

    if settings.storage is None:
        raise SweepError("export copies a study out of an RDB storage; set --storage (or sweep.storage)")
    plan = plan_sweep(settings)
    source = open_storage(plan, create=False)
    study = load_existing_study(plan, source)
    trials = study.get_trials(deepcopy=False)
    unfinished = [t.number for t in trials if not t.state.is_finished()]
    if unfinished:  # copied as RUNNING, they would look interrupted to the journal's liveness check
        raise SweepError(
            f"study {plan.study_name!r} has unfinished trials {unfinished} (running or queued); "
            "export it when its workers are done"
        )
    local = dataclasses.replace(settings, storage=None)
    target = plan_sweep(local)
    # Written beside the journal, then moved into place: no reader sees half a study, and an earlier export (or
    # a local run) of the same study is replaced, not merged into.
    tmp = target.journal_path.with_name(".journal.log.export")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.unlink(missing_ok=True)
    journal = optuna.storages.JournalStorage(JournalFileBackend(str(tmp)))
    copy = optuna.create_study(storage=journal, study_name=plan.study_name, directions=study.directions)
    source_id, copy_id = source.get_study_id_from_name(plan.study_name), journal.get_study_id_from_name(plan.study_name)
    for key, value in source.get_study_user_attrs(source_id).items():
        copy.set_user_attr(key, value)
    for key, value in source.get_study_system_attrs(source_id).items():  # metric names among them
        journal.set_study_system_attr(copy_id, key, value)
    copy.add_trials(trials)  # in order, so trial numbers (and retries' `failed_trial`) are kept
    del journal, copy
    os.replace(tmp, target.journal_path)
    recorded = dataclasses.asdict(local) | {"exported_from": redact(settings.storage)}
    atomic_write_json(target.study_dir / "settings.json", {"settings": recorded, **_plan_info(target)})
    log.info("exported %d trials of %s to %s", len(trials), plan.study_name, target.journal_path)
    return write_outputs(local)


def _importances(study: optuna.Study) -> dict[str, float] | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (ValueError, RuntimeError) as err:
        log.warning("parameter importances unavailable: %s", err)
        return None


def _write_plots(plan: Plan, study: optuna.Study, n_complete: int) -> tuple[list[str], dict[str, str]]:
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt
    import numpy as np
    from optuna.visualization import matplotlib as vm

    target = {"target_name": plan.metric}
    makers: dict[str, Callable[[], Any]] = {
        "optimization_history": lambda: vm.plot_optimization_history(study, **target),
        "contour_gamma_ratio": lambda: vm.plot_contour(study, params=[GAMMA, RATIO], **target),
        "param_importances": lambda: vm.plot_param_importances(study, **target),
        "slice": lambda: vm.plot_slice(study, params=[GAMMA, RATIO], **target),
        "intermediate_values": lambda: vm.plot_intermediate_values(study),
    }
    need = {"contour_gamma_ratio": 2, "param_importances": 2, "intermediate_values": 0}
    written, skipped = [], {}
    for name, make in makers.items():
        if n_complete < need.get(name, 1):
            skipped[name] = f"needs {need.get(name, 1)} complete trials, the study has {n_complete}"
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = make()
        except (ValueError, RuntimeError) as err:
            skipped[name] = str(err)
            continue
        fig = np.asarray(ax).flat[0].figure
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        path = plan.study_dir / "plots" / f"{name}.png"
        atomic_write_bytes(path, buf.getvalue())
        written.append(str(path))
    return written, skipped
