"""Benchmark: the ViT-Adapter's cost over its ViT baseline on CPU (train step, backbone only), project issue 5.

For every model and input size it times one training step (forward + backward with fixed random upstream gradients
on the four output maps; no head, no optimizer) of three backbones built in the same process:
- adapter:  ``create_model(<model>, task="det", window_attn=False)`` (detection ``add_vit_feature`` mode)
- baseline: its N = 0 ViT baseline ``create_model("vit_<size>", ...)`` (plain ViT + the paper's baseline neck)
- timm:     a plain timm ``VisionTransformer`` of the same size and block settings (LayerScale, eps 1e-6,
            drop-path 0.1, no class token, no final norm) + the same baseline neck: the guard that our
            baseline's ViT is not slower than timm's.
All run in train mode at batch 2 with ``--threads`` intra-op threads; after ``--warmup`` steps each, the three
are called in turn (order rotated every round, so load drift hits all alike) and the median of ``--repeats``
steps is reported. Output: one line per model and size, then (``--json``) one JSON line keyed "<model>@<res>".
``--profile`` adds a per-component torch.profiler breakdown of the adapter step (forward and backward).

``--embedded`` adds a row for the embedded default's own workload (key ``embedded@<size>``): the full model of
``experiments/cpu_default.yaml`` (backbone + its segmentation head + loss, forward and backward) at the profile's
input size and batch, on the profile's thread count (1), against the same model with the ``baseline`` overlay.

``--compare-ref REF`` also builds the adapter and baseline of another commit from a ``git worktree`` checkout (under
a temporary directory, removed afterwards) and times them in the same process, interleaved with this checkout's, so
that both see the same load: ``ref_adapter_ms``, ``ref_baseline_ms`` and ``adapter_speedup_vs_ref`` (ref / this).
The other checkout's ``vit_adapter`` package is imported under its own name by swapping ``sys.modules`` while its
models are built; its deformable core runs whatever backend that commit has.

    python bench/overhead.py --models vit_adapter_t,vit_adapter_s --res 256,512 [--json] [--profile]
    python bench/overhead.py --models vit_adapter_t --res 256 --embedded --compare-ref 79e8ea4
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from vit_adapter.models import adapter as adapter_module  # noqa: E402
from vit_adapter.models import attention as attention_module  # noqa: E402
from vit_adapter.models import factory as factory_module  # noqa: E402
from vit_adapter.models.baseline import BaselineNeck  # noqa: E402
from vit_adapter.models.factory import preset_kwargs  # noqa: E402
from vit_adapter.models.ops import resolve_backend  # noqa: E402

BATCH = 2
EMBEDDED_PROFILE = "cpu_default"  # the embedded default (experiments/cpu_default.yaml)
REPO = Path(__file__).resolve().parents[1]


class TimmBaseline(nn.Module):
    """timm ``VisionTransformer`` (blocks as our baseline's) feeding the paper's baseline neck."""

    def __init__(
        self, *, embed_dim: int, depth: int, num_heads: int, drop_path_rate: float, pretrain_size: int = 224
    ) -> None:
        super().__init__()
        self.vit = VisionTransformer(
            img_size=pretrain_size,
            patch_size=16,
            num_classes=0,
            global_pool="",
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=4.0,
            qkv_bias=True,
            init_values=1.0,
            class_token=False,
            final_norm=False,
            dynamic_img_size=True,
            drop_path_rate=drop_path_rate,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
        )
        self.taps = {depth * k // 4 - 1 for k in range(1, 5)}
        self.neck = BaselineNeck(dim=embed_dim)

    def forward(self, image: Tensor) -> list[Tensor]:
        x = self.vit.patch_embed(image)  # (B, H, W, D) with dynamic_img_size
        grid = (x.shape[1], x.shape[2])
        x = self.vit.norm_pre(self.vit.patch_drop(self.vit._pos_embed(x)))
        feats = []
        for i, blk in enumerate(self.vit.blocks):
            x = blk(x)
            if i in self.taps:
                feats.append(x)
        return self.neck(feats, grid)


def build_models(model: str, factory: object = factory_module, with_timm: bool = True) -> dict[str, nn.Module]:
    """{'adapter', 'baseline', 'timm'} for an adapter preset name like ``vit_adapter_t``; ``factory`` is the
    ``vit_adapter.models.factory`` module of the checkout to build from."""
    if not model.startswith("vit_adapter_"):
        raise ValueError(f"expected an adapter preset vit_adapter_<size>, got {model!r}")
    size = model.removeprefix("vit_adapter_")
    torch.manual_seed(0)
    adapter = factory.create_model(model, task="det", window_attn=False)
    baseline = factory.create_model(f"vit_{size}", task="det", window_attn=False)
    if not with_timm:
        return {"adapter": adapter.train(), "baseline": baseline.train()}
    kw = preset_kwargs(f"vit_{size}", "det")
    timm_ref = TimmBaseline(
        embed_dim=kw["embed_dim"],
        depth=kw["depth"],
        num_heads=kw["num_heads"],
        drop_path_rate=kw["drop_path_rate"],
        pretrain_size=kw.get("pretrain_size", 224),
    )
    return {"adapter": adapter.train(), "baseline": baseline.train(), "timm": timm_ref.train()}


def upstream_grads(model: nn.Module, image: Tensor, seed: int = 1) -> list[Tensor]:
    """Fixed random gradients shaped like the four outputs (one forward in no_grad mode to get the shapes)."""
    with torch.no_grad():
        shapes = [o.shape for o in model(image)]
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) for s in shapes]


def train_step(model: nn.Module, image: Tensor, grads: Sequence[Tensor]) -> None:
    model.zero_grad(set_to_none=True)
    outs = model(image)
    torch.autograd.backward(outs, list(grads))


def time_interleaved(
    fns: dict[str, Callable[[], object]], warmup: int, repeats: int, clock: Callable[[], float] = time.perf_counter
) -> dict[str, list[float]]:
    """Milliseconds per call; warm-ups first, then the functions in turn with the order rotated every round."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = clock()
            fns[name]()
            times[name].append((clock() - start) * 1e3)
    return times


class RefCheckout:
    """Another commit's ``vit_adapter`` package, checked out as a ``git worktree`` in a temporary directory.

    ``with checkout:`` swaps its modules into ``sys.modules`` (and this checkout's out), so that imports inside
    resolve to its code; on exit both sets are swapped back, and its modules are kept for the next entry. Objects
    built inside keep working outside: they hold their own module globals. (A commit from before the heads stopped
    patching torchvision leaves its wrapper in ``roi_heads.fastrcnn_loss``; that wrapper defaults to torchvision's
    own loss, and this checkout's detector does not call it.)
    """

    def __init__(self, ref: str, repo: Path = REPO) -> None:
        self.ref, self.repo = ref, repo
        self.tmp = Path(tempfile.mkdtemp(prefix="vit_adapter_compare_"))
        self.root = self.tmp / "tree"
        subprocess.run(
            ["git", "-C", str(repo), "worktree", "add", "--detach", str(self.root), ref],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        self.commit = subprocess.run(
            ["git", "-C", str(self.root), "rev-parse", "--short", "HEAD"], check=True, capture_output=True, text=True
        ).stdout.strip()
        self._modules: dict[str, object] = {}
        self._saved: dict[str, object] = {}

    @staticmethod
    def _ours(name: str) -> bool:
        return name == "vit_adapter" or name.startswith("vit_adapter.")

    def __enter__(self) -> RefCheckout:
        self._saved = {k: v for k, v in sys.modules.items() if self._ours(k)}
        for k in self._saved:
            del sys.modules[k]
        sys.modules.update(self._modules)
        sys.path.insert(0, str(self.root))
        return self

    def __exit__(self, *exc: object) -> None:
        sys.path.remove(str(self.root))
        self._modules = {k: v for k, v in sys.modules.items() if self._ours(k)}
        for k in self._modules:
            del sys.modules[k]
        sys.modules.update(self._saved)

    def module(self, name: str) -> object:
        """``importlib.import_module(name)`` from this checkout (call inside ``with``)."""
        return importlib.import_module(name)

    def close(self) -> None:
        subprocess.run(
            ["git", "-C", str(self.repo), "worktree", "remove", "--force", str(self.root)],
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        shutil.rmtree(self.tmp, ignore_errors=True)
        subprocess.run(["git", "-C", str(self.repo), "worktree", "prune"], check=False)


def _share_weights(src: nn.Module, dst: nn.Module) -> None:
    """Same weights in both checkouts where the state dicts match (timings barely depend on them: best effort)."""
    with contextlib.suppress(RuntimeError):
        dst.load_state_dict(src.state_dict())


def _summarise(times: dict[str, list[float]]) -> dict[str, float]:
    med = {name: statistics.median(t) for name, t in times.items()}
    row = {
        "adapter_ms": round(med["adapter"], 1),
        "baseline_ms": round(med["baseline"], 1),
        "ratio": round(med["adapter"] / med["baseline"], 3),
    }
    if "timm" in med:
        row.update(timm_ms=round(med["timm"], 1), baseline_over_timm=round(med["baseline"] / med["timm"], 3))
    if "ref_adapter" in med:
        row.update(
            ref_adapter_ms=round(med["ref_adapter"], 1),
            ref_baseline_ms=round(med["ref_baseline"], 1),
            ref_ratio=round(med["ref_adapter"] / med["ref_baseline"], 3),
            adapter_speedup_vs_ref=round(med["ref_adapter"] / med["adapter"], 3),
            baseline_speedup_vs_ref=round(med["ref_baseline"] / med["baseline"], 3),
        )
    return row


def run_case(
    model: str, res: int, warmup: int, repeats: int, cpu_time: bool = False, ref: RefCheckout | None = None
) -> dict[str, float]:
    models = build_models(model)
    if ref is not None:
        with ref:
            ref_models = build_models(model, ref.module("vit_adapter.models.factory"), with_timm=False)
        for name, m in ref_models.items():
            _share_weights(models[name], m)
            models[f"ref_{name}"] = m
    image = torch.randn(BATCH, 3, res, res, generator=torch.Generator().manual_seed(0))
    grads = upstream_grads(models["adapter"], image)
    fns = {name: partial(train_step, m, image, grads) for name, m in models.items()}
    return _summarise(time_interleaved(fns, warmup, repeats, time.process_time if cpu_time else time.perf_counter))


def _embedded_models(config: object, build: object) -> tuple[dict[str, nn.Module], object]:
    """The embedded default's full models (adapter, and the same profile with the ``baseline`` overlay)."""
    cfg = config.load_config(EMBEDDED_PROFILE)
    torch.manual_seed(0)
    adapter = build.build_model(cfg)
    baseline = build.build_model(config.load_config(EMBEDDED_PROFILE, ["baseline"]))
    return {"adapter": adapter.train(), "baseline": baseline.train()}, cfg


def seg_train_step(model: nn.Module, image: Tensor, target: Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model.losses(image, target)["loss"].backward()


def run_embedded(
    warmup: int, repeats: int, cpu_time: bool = False, ref: RefCheckout | None = None
) -> tuple[str, dict[str, float]]:
    """The embedded default's full-model train step at its own input size, batch and thread count."""
    from vit_adapter.engine import build, config

    models, cfg = _embedded_models(config, build)
    if ref is not None:
        with ref:
            ref_config, ref_build = (ref.module(f"vit_adapter.engine.{name}") for name in ("config", "build"))
            ref_models, _ = _embedded_models(ref_config, ref_build)
        for name, m in ref_models.items():
            _share_weights(models[name], m)
            models[f"ref_{name}"] = m
    size, batch = cfg.data.image_size, cfg.data.batch_size
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(batch, 3, size, size, generator=gen)
    target = torch.randint(0, cfg.head.num_classes, (batch, size, size), generator=gen)
    fns = {name: partial(seg_train_step, m, image, target) for name, m in models.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.train.threads)
    try:
        times = time_interleaved(fns, warmup, repeats, time.process_time if cpu_time else time.perf_counter)
    finally:
        torch.set_num_threads(threads)
    row = _summarise(times)
    row.update(batch=batch, threads=cfg.train.threads)
    return f"embedded@{size}", row


# ----------------------------------------------------------------------------------------------------------
# Per-component profile: forward ops are labelled by the module they run in (record_function via hooks), and
# every backward node inherits the label of the forward op that created it (matched by autograd sequence number).

_LABEL = "cmp::"


def _component(name: str, module: nn.Module) -> str | None:
    """Label of a module of ``ViTAdapter`` (None: not a component boundary)."""
    parts = name.split(".")
    if name == "vit.patch_embed":
        return "vit.patch_embed"
    if len(parts) == 3 and parts[:2] == ["vit", "blocks"]:
        return "vit.blocks"
    if name == "prior":
        return "spm"
    if parts[0] == "prior" and len(parts) == 2:
        return {"stem": "stem", "fc1": "fc", "fc2": "fc", "fc3": "fc", "fc4": "fc"}.get(parts[1], "conv2-4")
    if name == "baseline_neck":
        return "baseline neck"
    if len(parts) == 3 and parts[0] == "interactions" and parts[2] == "injector":
        return "injector"
    if len(parts) == 4 and parts[0] == "interactions" and parts[2] == "extractors":
        return "extractor"
    if parts[0] == "interactions" and len(parts) in (4, 5):
        leaf = parts[-1]
        if leaf == "attn":
            return "attn"
        if leaf == "ffn":
            return "convffn"
        if leaf.endswith("_norm"):
            return "layernorm"
    return None


@contextlib.contextmanager
def _labelled(model: nn.Module) -> Iterator[None]:
    """Wrap component modules, the deformable core and the adapter's output neck in record_function ranges."""
    handles, stack = [], []

    def enter(label: str, *_: object) -> None:
        rf = torch.autograd.profiler.record_function(_LABEL + label)
        rf.__enter__()
        stack.append(rf)

    def leave(*_: object) -> None:
        stack.pop().__exit__(None, None, None)

    for name, mod in model.named_modules():
        label = _component(name, mod)
        if label is not None:
            handles.append(mod.register_forward_pre_hook(partial(enter, label)))
            handles.append(mod.register_forward_hook(leave))

    core, outputs = attention_module.ms_deform_attn, adapter_module.ViTAdapter._adapter_outputs

    def core_labelled(*args: object, **kw: object) -> Tensor:
        with torch.autograd.profiler.record_function(_LABEL + "deform core"):
            return core(*args, **kw)

    def outputs_labelled(self: nn.Module, *args: object, **kw: object) -> list[Tensor]:
        with torch.autograd.profiler.record_function(_LABEL + "output neck"):
            return outputs(self, *args, **kw)

    attention_module.ms_deform_attn = core_labelled
    adapter_module.ViTAdapter._adapter_outputs = outputs_labelled
    try:
        yield
    finally:
        attention_module.ms_deform_attn = core
        adapter_module.ViTAdapter._adapter_outputs = outputs
        for h in handles:
            h.remove()


def _label_path(event: object) -> str:
    labels = []
    while event is not None:
        if event.name.startswith(_LABEL):
            labels.append(event.name[len(_LABEL) :])
        event = event.cpu_parent
    return "/".join(reversed(labels)) or "glue"


def profile_components(model: nn.Module, image: Tensor, grads: Sequence[Tensor], steps: int) -> dict[str, list]:
    """{component path: [forward ms, backward ms]} per step, from torch.profiler over ``steps`` train steps."""
    train_step(model, image, grads)  # warm
    with _labelled(model), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            train_step(model, image, grads)
    events = prof.events()
    seq_path: dict[int, str] = {}
    result: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    engine = "autograd::engine::evaluate_function: "
    for ev in events:
        if ev.name.startswith(_LABEL) or ev.name.startswith(engine):
            continue
        in_backward, parent = False, ev.cpu_parent
        while parent is not None:
            in_backward |= parent.name.startswith(engine)
            parent = parent.cpu_parent
        if in_backward:
            continue
        path = _label_path(ev)
        if ev.sequence_nr >= 0:
            seq_path[ev.sequence_nr] = path
        if ev.cpu_parent is None or ev.cpu_parent.name.startswith(_LABEL):  # outermost op: count its time once
            result[path][0] += ev.cpu_time_total / 1e3 / steps
    for ev in events:
        if ev.name.startswith(engine) and ev.cpu_parent is None:
            node = ev.name[len(engine) :]
            path = seq_path.get(ev.sequence_nr, "grad accumulation" if "AccumulateGrad" in node else "glue")
            result[path][1] += ev.cpu_time_total / 1e3 / steps
    return dict(result)


def format_profile(title: str, comps: dict[str, list[float]]) -> str:
    total = sum(f + b for f, b in comps.values())
    lines = [f"{title}: profiled step {total:.0f} ms (profiler overhead included)"]
    lines.append(f"  {'component':34s} {'fwd ms':>8s} {'bwd ms':>8s} {'total':>8s} {'share':>6s}")
    for path, (f, b) in sorted(comps.items(), key=lambda kv: -sum(kv[1])):
        lines.append(f"  {path:34s} {f:8.1f} {b:8.1f} {f + b:8.1f} {100 * (f + b) / total:5.1f}%")
    return "\n".join(lines)


def markdown_table(results: dict[str, dict[str, float]]) -> str:
    """The results as a Markdown table (for the generated report)."""
    rows = [
        "| model @ res | adapter ms | baseline ms | ratio | timm ms | baseline / timm |",
        "|---|---|---|---|---|---|",
    ]
    for key, r in results.items():
        timm = f"{r['timm_ms']:.0f} | {r['baseline_over_timm']:.3f}" if "timm_ms" in r else "– | –"
        rows.append(f"| {key} | {r['adapter_ms']:.0f} | {r['baseline_ms']:.0f} | {r['ratio']:.2f} | {timm} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------------------
def _csv(kind: Callable[[str], object]) -> Callable[[str], list]:
    return lambda s: [kind(v) for v in s.split(",") if v]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=_csv(str), default=["vit_adapter_t", "vit_adapter_s"])
    p.add_argument("--res", type=_csv(int), default=[256, 512], help="square input sizes, multiples of 32")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per backbone first (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per backbone; the median is reported")
    p.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with this process's CPU time instead of wall-clock: on a shared machine with --threads 1 it counts "
        "only this process's work (with more threads it also counts OpenMP spin-waiting)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON line with all results at the end")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="also write the JSON results, plus a 'host' string, to this file (atomically)",
    )
    p.add_argument("--markdown", action="store_true", help="also print the results as a Markdown table")
    p.add_argument("--profile", action="store_true", help="also print a per-component profile of the adapter step")
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument(
        "--embedded",
        action="store_true",
        help=f"also time the embedded default's full model ({EMBEDDED_PROFILE}: its input size, batch and threads)",
    )
    p.add_argument("--no-grid", action="store_true", help="skip the --models x --res rows (e.g. with --embedded)")
    p.add_argument(
        "--compare-ref",
        metavar="REF",
        default=None,
        help="also time the adapter and baseline of git commit REF (a temporary worktree), interleaved in-process",
    )
    args = p.parse_args(argv)
    if args.threads < 1 or args.repeats < 1 or args.warmup < 0 or args.profile_steps < 1:
        p.error("--threads, --repeats and --profile-steps must be >= 1, --warmup >= 0")
    if any(r <= 0 or r % 32 for r in args.res):
        p.error(f"--res values must be positive multiples of 32, got {args.res}")
    return args


def run_all(args: argparse.Namespace, ref: RefCheckout | None = None) -> dict[str, dict[str, float]]:
    print(
        f"# torch {torch.__version__}, {platform.machine()}, {args.threads} threads, batch {BATCH}, "
        f"warmup {args.warmup}, median of {args.repeats}, train mode, backbone only, "
        + ("process CPU time" if args.cpu_time else "wall-clock")
        + f", deformable core: {resolve_backend('cpu')}"
        + (f", compared with {args.compare_ref} ({ref.commit})" if ref is not None else "")
    )
    results: dict[str, dict[str, float]] = {}
    if args.embedded:
        key, r = run_embedded(args.warmup, args.repeats, args.cpu_time, ref)
        results[key] = r
        print(f"{key:22s} " + "  ".join(f"{k}={v}" for k, v in r.items()), flush=True)
    for model in [] if args.no_grid else args.models:
        for res in args.res:
            r = run_case(model, res, args.warmup, args.repeats, args.cpu_time, ref)
            key = f"{model}@{res}"
            results[key] = r
            print(f"{key:22s} " + "  ".join(f"{k}={v}" for k, v in r.items()), flush=True)
            if args.profile:
                models = build_models(model)
                image = torch.randn(BATCH, 3, res, res, generator=torch.Generator().manual_seed(0))
                grads = upstream_grads(models["adapter"], image)
                comps = profile_components(models["adapter"], image, grads, args.profile_steps)
                print(format_profile(f"{key} adapter", comps), flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cores = os.cpu_count() or 1
    if args.threads > cores:
        print(f"warning: {args.threads} threads > {cores} cores (oversubscription distorts timings)", file=sys.stderr)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    ref = RefCheckout(args.compare_ref) if args.compare_ref else None
    try:
        results = run_all(args, ref)
    finally:
        torch.set_num_threads(threads)  # main() is also called in-process (tests): leave the thread count as found
        if ref is not None:
            ref.close()
    if args.markdown:
        print(markdown_table(results))
    if args.json:
        print(json.dumps(results))
    if args.out is not None:
        from vit_adapter.engine.rundir import cpu_model
        from vit_adapter.utils.io import atomic_write_json

        # Ratios depend on the CPU (memory-bound adapter glue vs GEMM-bound ViT), so the file names the host.
        host = (
            f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads, "
            f"deformable core {resolve_backend('cpu')}"
        )
        atomic_write_json(args.out, {**results, "host": host})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
