"""The resolved sweep: configs, metric, budget, study name and directory (``plan_sweep``)."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..engine.config import EXECUTION_KEYS, Config, config_hash, load_config
from ..engine.identity import code_digest, identity_of, input_digests, run_identity
from .settings import GAMMA, METRIC_FOR_TASK, RATIO, SPACE_VERSION, SweepError, SweepSettings, redact


@dataclass(frozen=True)
class Plan:
    settings: SweepSettings
    base_sets: tuple[str, ...]  # budget sets + user sets; the trial's own values are appended last
    task: str
    metric: str
    max_iters: int
    eval_interval: int
    study_name: str
    study_dir: Path
    objective_key: dict[str, Any]  # what the study name hashes, input digests included
    inputs: dict[str, Any]  # input_digests(scope="sweep"): code (sweep driver included), data, weights
    identity: str  # identity_of(objective digest, inputs); the study name carries its first 10 hex digits

    @property
    def journal_path(self) -> Path:
        return self.study_dir / "journal.log"

    @property
    def run_inputs(self) -> dict[str, Any]:
        """The input digests of one training run: the study's data and weights (no trial changes those), the
        code of the run scope (what the DVC train stages hash too)."""
        return {**self.inputs, "code": code_digest("run")}

    def run_identity(self, cfg: Config) -> str:
        return run_identity(cfg, self.run_inputs)[0]

    @property
    def uses_journal(self) -> bool:
        return self.settings.storage is None

    def config(self, seed: int, model: Mapping[str, Any]) -> Config:
        """The resolved config of one run: base + the given model keys + seed + threads."""
        s = self.settings
        tail = [f"model.{k}={_yaml_value(v)}" for k, v in model.items()]
        tail += [f"train.seed={seed}", f"train.threads={s.threads}"]
        cfg = load_config(s.profile, s.overlays, [*self.base_sets, *tail])
        for k, v in model.items():  # the YAML round trip must not change a searched value
            if getattr(cfg.model, k) != v:
                raise SweepError(f"model.{k}: {v!r} became {getattr(cfg.model, k)!r} in the config")
        return cfg

    def trial_dir(self, root_number: int) -> Path:
        return self.study_dir / "trials" / f"trial_{root_number:04d}"

    def reference_dir(self, name: str) -> Path:
        return self.study_dir / "reference" / name


def _yaml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(float(v)) if isinstance(v, float) else str(v)  # repr: shortest string that round-trips


def _budget_sets(s: SweepSettings) -> list[str]:
    """A shorter schedule of the same shape: milestones and warmup scale with max_iters."""
    if s.max_iters is None:
        return [f"train.eval_interval={s.eval_interval}"] if s.eval_interval else []
    cfg = load_config(s.profile, s.overlays, [])
    scale = s.max_iters / cfg.train.max_iters
    milestones = sorted({round(m * scale) for m in cfg.optim.milestones} - {0})
    milestones = [m for m in milestones if m < s.max_iters]
    ev = s.eval_interval or math.ceil(s.max_iters / 4)  # 4 evaluations, the last one at max_iters
    return [
        f"train.max_iters={s.max_iters}",
        f"train.eval_interval={ev}",
        f"train.checkpoint_interval={ev}",  # a killed trial resumes from its last evaluation
        f"optim.milestones={milestones}",
        f"optim.warmup_iters={round(cfg.optim.warmup_iters * scale)}",
    ]


def plan_sweep(s: SweepSettings) -> Plan:
    """Resolve the settings; raises SweepError/ConfigError for anything wrong before a study is touched."""
    s.validate()
    base = tuple(_budget_sets(s) + list(s.sets))
    probe = load_config(s.profile, s.overlays, [*base, f"train.threads={s.threads}"])
    task = probe.model.task
    metric = s.metric or METRIC_FOR_TASK[task]
    # What defines the objective: the run config minus execution details and the per-trial values.
    exclude = (*EXECUTION_KEYS, "train.seed", "model.gamma_init", "model.cffn_ratio", "model.with_cffn")
    key: dict[str, Any] = {
        "config_hash": config_hash(probe, exclude=exclude),
        "metric": metric,
        "seeds": list(s.seeds),
        "space": {GAMMA: [1e-6, 1.0, "log"], RATIO: [1 / 16, 1.0, "uniform"]},
        "version": SPACE_VERSION,
        # What decides which trials run and which are pruned (sweep/batches.py): the same key, the same trials.
        "search": {
            "sampler_seed": s.sampler_seed,
            "batch_size": s.batch_size,
            "n_startup_trials": s.n_startup_trials,
            "pruner": {
                "name": s.pruner,
                "startup_trials": s.prune_startup_trials,
                "warmup_evals": s.prune_warmup_evals,
                "below": s.prune_below,
            },
            "max_retry": s.max_retry,
        },
    }
    # Content, not paths: re-pretrained weights or regenerated data at the same path, or edited code, make every
    # trial stale, in the journal and in a shared database alike. The searched keys change neither input.
    inputs = input_digests(probe, scope="sweep")
    identity = identity_of(hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest(), inputs)
    key["inputs"] = inputs
    name = s.study_name or f"gamma-cffn-{task}-{metric}-{identity[:10]}"
    if not name or "/" in name or name.startswith("."):
        raise SweepError(f"study_name {name!r} must be a plain directory name")
    ev = probe.train.eval_interval or probe.train.max_iters
    return Plan(s, base, task, metric, probe.train.max_iters, ev, name, Path(s.out_dir) / name, key, inputs, identity)


def _plan_info(plan: Plan) -> dict[str, Any]:
    return {
        "study_name": plan.study_name,
        "study_dir": str(plan.study_dir),
        "storage": redact(plan.settings.storage) if plan.settings.storage else str(plan.journal_path),
        "metric": plan.metric,
        "task": plan.task,
        "max_iters": plan.max_iters,
        "objective": plan.objective_key,
        "inputs": plan.inputs,  # also inside "objective"; here for readers who look for the digests
        "identity": plan.identity,
        "base_sets": list(plan.base_sets),
    }
