"""Digests of one micro-profile run (data, two-phase pretraining, training, evaluation) of one variant.

A refactor that claims "no change to what any stage computes" is checked by running this in a worktree of the
commit before and of the commit after, and comparing the printed lines byte for byte:

    git worktree add /tmp/before REV && cd /tmp/before && OMP_NUM_THREADS=1 PYTHONPATH=/tmp/before \\
        python /path/to/tests/helpers/micro_digest.py /tmp/out-before full > /tmp/before.json

Printed: the generated data's digest, both weight files' sha256, the final and per-evaluation metrics, the last
checkpoint's model state and the training log's loss and learning rate per iteration (timings left out).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import torch

import vit_adapter
from vit_adapter.data import generate_dataset
from vit_adapter.engine.config import load_config
from vit_adapter.engine.pretrain import pretrain
from vit_adapter.engine.trainer import train

# The micro profile of tests/test_pipeline.py.
MICRO = [
    "data.image_size=64",
    "data.n_train=8",
    "data.n_val=4",
    "data.batch_size=4",
    "model.pretrain_size=32",
    "train.max_iters=4",
    "train.eval_interval=2",
    "train.checkpoint_interval=2",
    "train.log_interval=1",
    "optim.warmup_iters=0",
]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _state_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def digests(out: Path, variant: str) -> dict[str, Any]:
    base = load_config("cpu_default", [variant], MICRO)
    data = out / "data"
    generate_dataset(data, n_train=8, n_val=4, image_size=64, seed=0, overwrite=True, **dict(base.data.generator))
    common = dict(
        preset="vit_cpu", image_size=32, batch_size=8, n_train=32, n_val=16, warmup_steps=1, seed=0,
        cache_dir=str(out / "cache"),
    )  # fmt: skip
    items, weights = out / "items.safetensors", out / "w.safetensors"
    pretrain(out=items, objective="classify", steps=2, **common)
    pretrain(out=weights, objective="scene_tokens", steps=3, init_from=str(items), **common)
    cfg = load_config("cpu_default", [variant], [*MICRO, f"weights.source={weights}", f"data.root={data}"])
    run = out / "run"
    train(cfg, run, resume=False, progress=False)
    metrics = json.loads((run / "metrics.json").read_text())
    last = sorted((run / "checkpoints").glob("iter_*.pt"))[-1]
    state = torch.load(last, map_location="cpu", weights_only=False)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    data_files = sorted(p for p in data.rglob("*") if p.is_file())
    return {
        "data": hashlib.sha256("".join(_sha256(p) for p in data_files).encode()).hexdigest(),
        "items": _sha256(items),
        "weights": _sha256(weights),
        "final": metrics["final"],
        "history": metrics["history"],
        "last_checkpoint": last.name,
        "model_state": _state_digest(state.get("model", state)),
        "train_log": [{k: row[k] for k in ("iter", "lr", "loss")} for row in log],
    }


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    print("package:", vit_adapter.__file__, file=sys.stderr)
    print(json.dumps(digests(Path(argv[0]), argv[1] if len(argv) > 1 else "full"), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
