"""Which trials a study runs, decided so that a rerun gives the same trials whatever the machine's load.

Each trial holds a *slot* (user attribute ``slot``: 0, 1, 2, ... in the order the study needs them; a retry of
an interrupted trial keeps its slot). Slots come in batches of ``batch_size``: slot k is in batch k //
batch_size. The parameters of every slot of batch b are drawn, in slot order, by a TPE sampler seeded with
(sampler_seed, b) that sees only the final outcomes of the slots of batches < b, in slot order; a slot of
batch b is only created once all of those are finished. Pruning a trial of batch b compares its reported values
with the same earlier batches only. So neither completion order, wall time, the number of workers nor which
worker ran what can change a parameter or a pruning decision: they follow from the reported values alone.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState

from .locks import WorkerLocks
from .plan import Plan
from .settings import FAILURE_ATTR, GAMMA, RATIO
from .storage import make_pruner, recover

log = logging.getLogger(__package__)

SLOT_ATTR = "slot"
# System attributes a pruner keeps on its trials (successive halving's rungs); mirrored into the real trial so
# that later batches' reference studies see them.
_PRUNER_ATTR_PREFIX = "completed_rung_"
_FINISHED = ("good", "failed")


class _QuietOptuna(logging.Filter):
    """Optuna's log without what the sweep says better itself: "A new study created in memory" for every
    reference study, and the traceback of a trial that failed for a known reason (a diverged loss: the trial's
    one-line failure is all there is to say; a bug's traceback stays)."""

    def __init__(self, catch: tuple[type[Exception], ...]) -> None:
        super().__init__()
        self.catch = catch

    def filter(self, record: logging.LogRecord) -> bool:
        if "created in memory" in record.getMessage():
            return False
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, self.catch):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_optuna(catch: tuple[type[Exception], ...]) -> None:
    """Install _QuietOptuna once per process on the loggers that emit those records."""
    for name in ("optuna.storages._in_memory", "optuna.study._optimize"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietOptuna) for f in logger.filters):
            logger.addFilter(_QuietOptuna(catch))


def suggest(trial: optuna.Trial) -> tuple[float, float]:
    """The search space, in the order the objective and the batch sampler both suggest it."""
    return trial.suggest_float(GAMMA, 1e-6, 1.0, log=True), trial.suggest_float(RATIO, 1 / 16, 1.0)


def slots(study: optuna.Study) -> dict[int, list[FrozenTrial]]:
    """Trials by slot, oldest first (a retry comes after the trial it retries)."""
    out: dict[int, list[FrozenTrial]] = {}
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        out.setdefault(int(t.user_attrs[SLOT_ATTR]), []).append(t)
    return out


def slot_state(plan: Plan, trials: list[FrozenTrial]) -> str:
    """good (COMPLETE/PRUNED), failed (diverged, or interrupted more often than max_retry), waiting, running, or
    pending (interrupted; recover() queues its retry)."""
    t = trials[-1]
    if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return "good"
    if t.state == TrialState.FAIL:
        exhausted = len(t.system_attrs.get("retry_history", [])) >= plan.settings.max_retry
        return "failed" if FAILURE_ATTR in t.user_attrs or exhausted else "pending"
    return "waiting" if t.state == TrialState.WAITING else "running"


def reference_study(plan: Plan, by_slot: dict[int, list[FrozenTrial]], batch: int) -> optuna.Study:
    """An in-memory study holding the final outcome of every slot of the batches before `batch`, numbered by
    slot: what the sampler and the pruner of `batch` may see, identical on every rerun."""
    ref = optuna.create_study(study_name=plan.study_name, direction="maximize", pruner=make_pruner(plan))
    for k in range(batch * plan.settings.batch_size):
        t = by_slot[k][-1]
        state = t.state if t.state in (TrialState.COMPLETE, TrialState.PRUNED) else TrialState.FAIL
        ref.add_trial(
            optuna.trial.create_trial(
                state=state,
                values=t.values if state == TrialState.COMPLETE else None,
                params=t.params,
                distributions=t.distributions,
                intermediate_values=t.intermediate_values,
                system_attrs={k: v for k, v in t.system_attrs.items() if k.startswith(_PRUNER_ATTR_PREFIX)},
            )
        )
    return ref


def draw_params(plan: Plan, by_slot: dict[int, list[FrozenTrial]], slot: int) -> dict[str, float]:
    """The parameters of `slot`: the (slot - first slot of its batch)-th draw of its batch's seeded sampler."""
    s = plan.settings
    batch = slot // s.batch_size
    ref = reference_study(plan, by_slot, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        ref.sampler = optuna.samplers.TPESampler(
            seed=(s.sampler_seed * 1_000_003 + batch) % 2**31,
            n_startup_trials=s.n_startup_trials,
            multivariate=True,  # γ and the ratio may interact
            constant_liar=s.batch_size > 1,  # earlier draws of the batch count as bad: the batch spreads out
        )
        for _ in range(slot - batch * s.batch_size + 1):
            gamma, ratio = suggest(ref.ask())  # left RUNNING: the next draw of the batch sees it
    return {GAMMA: gamma, RATIO: ratio}


class SlotPruner:
    """The pruning decision of one trial of slot `slot`, made against its batch's reference study: the trial
    (and its batch's earlier slots, as running) is mirrored there, so a pruner sees the same study on every run."""

    def __init__(self, plan: Plan, study: optuna.Study, trial: FrozenTrial, slot: int) -> None:
        self.plan, self.study, self.trial_id = plan, study, trial._trial_id
        batch = slot // plan.settings.batch_size
        self.ref = reference_study(plan, slots(study), batch)
        storage, study_id = self.ref._storage, self.ref._study_id
        for _ in range(batch * plan.settings.batch_size, slot):  # earlier slots of the batch: running, unseen
            storage.create_new_trial(study_id)
        self.ref_id = storage.create_new_trial(study_id)
        for step, value in sorted(trial.intermediate_values.items()):  # a retry's inherited reports
            storage.set_trial_intermediate_value(self.ref_id, step, value)
        for key, value in trial.system_attrs.items():
            if key.startswith(_PRUNER_ATTR_PREFIX):
                storage.set_trial_system_attr(self.ref_id, key, value)

    def should_prune(self, step: int, value: float) -> bool:
        storage = self.ref._storage
        storage.set_trial_intermediate_value(self.ref_id, step, value)
        before = storage.get_trial(self.ref_id).system_attrs
        prune = self.ref.pruner.prune(self.ref, storage.get_trial(self.ref_id))
        for key, v in storage.get_trial(self.ref_id).system_attrs.items():
            if key.startswith(_PRUNER_ATTR_PREFIX) and before.get(key) != v:
                self.study._storage.set_trial_system_attr(self.trial_id, key, v)
        return bool(prune)


def _failures(plan: Plan, by_slot: dict[int, list[FrozenTrial]]) -> list[FrozenTrial]:
    return [v[-1] for v in by_slot.values() if slot_state(plan, v) == "failed"]


def next_trial(plan: Plan, study: optuna.Study, locks: WorkerLocks, worker: int, deadline: float | None) -> bool:
    """Called with the turnstile held; returns with it held. True: a WAITING trial exists (created here when
    the study needs one and its batch may start), ask for it now. False: stop (the study holds n_trials good
    trials, too many failed, or the time budget is spent). Otherwise wait for trials running elsewhere: they
    finish the batch (or die, and are retried)."""
    s = plan.settings
    poll = min(float(s.heartbeat_s), 2.0 if plan.uses_journal else 10.0)
    waited = False
    while True:
        recover(plan, study, study._storage)  # a sibling may have died; its trial must not count as running
        by_slot = slots(study)
        states = {k: slot_state(plan, v) for k, v in by_slot.items()}
        good = sum(v == "good" for v in states.values())
        open_ = sum(v not in _FINISHED for v in states.values())
        failed = _failures(plan, by_slot)
        if good >= s.n_trials:
            log.info("worker %d: the study holds its %d trials", worker, s.n_trials)
            return False
        if len(failed) >= (s.max_failed or s.n_trials):
            why = failed[-1].user_attrs.get(FAILURE_ATTR, "interrupted too often")
            log.info("worker %d: %d trials failed (e.g. %s); stopping", worker, len(failed), why)
            return False
        if deadline is not None and time.time() >= deadline:
            log.info("worker %d: the sweep's time budget is spent", worker)
            return False
        if "waiting" in states.values():
            return True
        slot = len(by_slot)
        first = (slot // s.batch_size) * s.batch_size
        if good + open_ < s.n_trials and all(states[k] in _FINISHED for k in range(first)):
            study.enqueue_trial(draw_params(plan, by_slot, slot), user_attrs={SLOT_ATTR: slot})
            return True
        if open_ == 0:  # nothing running anywhere and nothing to start: cannot happen, but never spin
            return False
        if not waited:
            log.info("worker %d: waiting for %d trial(s) running elsewhere", worker, open_)
            waited = True
        locks.turnstile.release()  # the others need it to finish (their callbacks) and to recover
        time.sleep(poll)
        locks.turnstile.acquire()


def run_trials(
    plan: Plan,
    study: optuna.Study,
    locks: WorkerLocks,
    objective: Callable[[optuna.Trial], float],
    catch: tuple[type[Exception], ...],
    worker: int,
    deadline: float | None,
) -> None:
    """Trials one at a time until next_trial() says stop: each `ask` pops the WAITING trial next_trial()
    guaranteed, under the turnstile (the objective releases it once the trial holds its lock)."""

    def release_trial_lock(study: optuna.Study, trial: FrozenTrial) -> None:
        if locks.trial is not None:  # the finished trial's state is stored now
            locks.trial.release()
            locks.trial = None

    quiet_optuna(catch)
    locks.turnstile.acquire()
    while next_trial(plan, study, locks, worker, deadline):
        study.optimize(objective, n_trials=1, catch=catch, callbacks=[release_trial_lock], gc_after_trial=True)
        locks.turnstile.acquire()
