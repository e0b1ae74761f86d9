"""Fetch backbone weights into one verified, timm-format ``.safetensors`` file plus a JSON sidecar.

Sources: a timm model name (downloaded by timm from its hub, online only), a ``http(s)://`` or ``file://`` URL
(verified by sha256), or a local ``.pth``/``.pt``/``.safetensors`` file. DeiT and most timm-era checkpoints
already use timm's key names; they are often wrapped as ``{'model': state_dict}``, which is unwrapped here.
The sidecar ``<out>.json`` records where the weights came from and both digests, so a run can cite them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from vit_adapter.utils.io import atomic_path, atomic_write_json, sha256_file

SUPPORTED_SUFFIXES = (".pth", ".pt", ".safetensors")
URL_SCHEMES = ("http", "https", "file")
_WRAPPER_KEYS = ("model", "state_dict")  # DeiT: {'model': sd}; mmcv/lightning: {'state_dict': sd}
_HUB_HASH_RE = re.compile(r"-([0-9a-f]{8,64})\.")  # torch.hub convention: name-<sha256 prefix>.pth
_CHUNK = 1 << 20


class WeightsError(ValueError):
    """Weights cannot be fetched, verified or converted; the message names the file and the problem."""


# ---------------------------------------------------------------------------------------------------------
# Verification (digests: vit_adapter.utils.io)
# ---------------------------------------------------------------------------------------------------------


def _normalise_sha(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    sha = sha256.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise WeightsError(f"sha256 must be 64 hex digits, got {sha256!r}")
    return sha


def _verify(actual: str, expected: str, what: str) -> None:
    """`expected` is a full digest or (torch.hub file names) a prefix of at least 8 hex digits."""
    if not actual.startswith(expected):
        kind = "sha256" if len(expected) == 64 else "sha256 prefix"
        raise WeightsError(f"{kind} mismatch for {what}: expected {expected}, got {actual}")


# ---------------------------------------------------------------------------------------------------------
# Reading checkpoints
# ---------------------------------------------------------------------------------------------------------


def _suffix(name: str) -> str:
    suffix = Path(name).suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise WeightsError(
            f"unsupported weights format {suffix or '(no suffix)'!r} for {name}: "
            f"expected one of {', '.join(SUPPORTED_SUFFIXES)} (convert .npz via its timm model name)"
        )
    return suffix


def read_checkpoint(path: str | Path, suffix: str | None = None) -> Any:
    """Load a checkpoint file without executing pickled code (weights_only=True)."""
    path = Path(path)
    suffix = suffix or _suffix(path.name)
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and safetensors errors have no common base class
        detail = " ".join(str(exc).split())[:300]
        raise WeightsError(f"cannot read {path} as {suffix} weights (weights_only): {detail}") from exc


def to_state_dict(obj: Any, what: str) -> dict[str, torch.Tensor]:
    """Unwrap {'model': ...}/{'state_dict': ...}, drop a DDP 'module.' prefix, check values are tensors."""
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{what} holds no state dict (got {type(obj).__name__})")
    bad = next((k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise WeightsError(f"{what}: entry {bad!r} is {type(obj[bad]).__name__}, not a tensor")
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


# ---------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------


def source_kind(source: str) -> str:
    """'url', 'file' or 'timm'. A string naming an existing file, or with a path separator or a weights
    suffix, is a file; anything else (e.g. 'deit_tiny_patch16_224.fb_in1k') is a timm model name."""
    scheme = urllib.parse.urlparse(source).scheme.lower()
    if scheme in URL_SCHEMES:
        return "url"
    path = Path(source)
    looks_like_file = os.sep in source or "/" in source or path.suffix.lower() in (*SUPPORTED_SUFFIXES, ".npz")
    return "file" if path.exists() or looks_like_file else "timm"


def _download(url: str, dest_dir: Path) -> tuple[Path, str]:
    """Stream `url` to a temp file in dest_dir (same filesystem as the output), hashing as it goes."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=".download.", suffix=".tmp")
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as fh, urllib.request.urlopen(url, timeout=60) as resp:  # noqa: S310
            while chunk := resp.read(_CHUNK):
                digest.update(chunk)
                fh.write(chunk)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, urllib.error.URLError | OSError):
            reason = getattr(exc, "reason", None) or exc
            raise WeightsError(f"cannot download {url}: {reason}") from exc
        raise
    return Path(tmp), digest.hexdigest()


def _from_url(url: str, sha256: str | None, work: Path) -> tuple[dict[str, torch.Tensor], str]:
    name = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name
    suffix = _suffix(name)
    expected = sha256
    if expected is None:
        hub = _HUB_HASH_RE.search(name)
        if hub is None:
            raise WeightsError(
                f"downloading {url} needs a sha256 (weights.sha256): none given and the file name "
                "carries no torch.hub hash prefix"
            )
        expected = hub.group(1)
    tmp, actual = _download(url, work)
    try:
        _verify(actual, expected, url)
        return to_state_dict(read_checkpoint(tmp, suffix), url), actual
    finally:
        tmp.unlink(missing_ok=True)


def _from_file(path: Path, sha256: str | None) -> tuple[dict[str, torch.Tensor], str]:
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    suffix = _suffix(path.name)
    actual = sha256_file(path)
    if sha256 is not None:
        _verify(actual, sha256, str(path))
    return to_state_dict(read_checkpoint(path, suffix), str(path)), actual


def _from_timm(name: str) -> dict[str, torch.Tensor]:
    import timm

    if not timm.is_model(name):
        raise WeightsError(f"{name!r} is neither an existing file, a URL nor a timm model name")
    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as exc:  # hub/network errors come in many types
        detail = " ".join(str(exc).split())[:300]
        raise WeightsError(
            f"cannot fetch pretrained timm weights {name!r} (needs network access to the hub, or a cached "
            f"copy): {type(exc).__name__}: {detail}"
        ) from exc
    return to_state_dict(model.state_dict(), f"timm model {name}")


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


def sidecar_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".json")


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """The JSON object of the sidecar of weights file `path`; WeightsError naming the sidecar when it is not
    UTF-8 JSON holding an object (a truncated or hand-edited one used to fail naming no file, or crash)."""
    side = sidecar_path(path)
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightsError(
            f"weights sidecar {side} is not valid JSON ({err}); delete it and fetch the weights again"
        ) from err
    if not isinstance(meta, dict):
        raise WeightsError(
            f"weights sidecar {side} holds a JSON {type(meta).__name__}, not an object; delete it and fetch again"
        )
    return meta


def weights_path_for(source: str, cache_dir: str | Path) -> Path:
    """A stable output file for `source` in `cache_dir`: readable stem + a short hash of the source string."""
    if source_kind(source) == "url":
        stem = Path(urllib.parse.urlparse(source).path).stem
    elif source_kind(source) == "file":
        stem = Path(source).stem
    else:
        stem = source
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "weights"
    tag = hashlib.sha256(source.encode("utf-8")).hexdigest()[:8]
    return Path(cache_dir) / f"{stem}-{tag}.safetensors"


def _cached(out: Path, source: str, sha256: str | None) -> bool:
    """True if `out` was already fetched from the same source (and sha) and is intact."""
    side = sidecar_path(out)
    if not (out.is_file() and side.is_file()):
        return False
    try:
        meta = read_sidecar(out)
    except (OSError, WeightsError):
        return False  # fetched again, and the sidecar rewritten
    same_input = sha256 is None or meta.get("input_sha256") == sha256
    return meta.get("source") == source and same_input and meta.get("output_sha256") == sha256_file(out)


def _save_safetensors(sd: Mapping[str, torch.Tensor], out: Path) -> None:
    from safetensors.torch import save_file

    # clone: safetensors refuses tensors that share storage (views, tied weights).
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})


def fetch_weights(source: str | Path, out: str | Path, sha256: str | None = None) -> Path:
    """Fetch `source` into `out` (.safetensors, timm keys) with a sidecar `<out>.json`; returns `out`.

    `sha256` verifies the input file (URL download or local file). A URL needs it unless its file name
    carries torch.hub's hash prefix (e.g. deit_tiny_patch16_224-a1311bcf.pth), which is then checked.
    For a timm name the input is timm's own download; there `sha256` is checked against the output file.
    An `out` already fetched from the same source is reused without work.
    """
    source, out = str(source), Path(out)
    if out.suffix != ".safetensors":
        raise WeightsError(f"output must be a .safetensors file, got {out}")
    sha = _normalise_sha(sha256)
    if _cached(out, source, sha):
        return out
    kind = source_kind(source)
    input_sha: str | None = None
    if kind == "url":
        sd, input_sha = _from_url(source, sha, out.parent)
    elif kind == "file":
        sd, input_sha = _from_file(Path(source), sha)
    else:
        sd = _from_timm(source)
    _save_safetensors(sd, out)
    output_sha = sha256_file(out)
    if kind == "timm" and sha is not None and output_sha != sha:
        out.unlink(missing_ok=True)
        raise WeightsError(f"sha256 mismatch for {out} (from timm {source}): expected {sha}, got {output_sha}")
    atomic_write_json(
        sidecar_path(out),
        {
            "source": source,
            "kind": kind,
            "input_sha256": input_sha,
            "output_sha256": output_sha,
            "n_tensors": len(sd),
            "n_params": int(sum(v.numel() for v in sd.values())),
            "fetched_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    )
    return out


def verify_file_sha256(path: str | Path, sha256: str | None, key: str = "sha256") -> Path:
    """Check a configured digest against a local weights file; returns `path`.

    It matches the file itself, or the input it was converted from when the sidecar says so and the sidecar's
    output digest is this file's (so a digest copied from `fetch-weights --sha256` keeps working)."""
    path = Path(path)
    sha = _normalise_sha(sha256)
    if sha is None:
        return path
    actual = sha256_file(path)
    if actual == sha:
        return path
    meta = read_sidecar(path) if sidecar_path(path).is_file() else {}
    if meta.get("output_sha256") == actual and meta.get("input_sha256") == sha:
        return path
    raise WeightsError(f"{key} mismatch for {path}: expected {sha}, got {actual}")


def load_weights(path: str | Path, verify: bool = True) -> dict[str, torch.Tensor]:
    """Read a fetched .safetensors; with `verify`, check it against the digest in its sidecar."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if verify and sidecar_path(path).is_file():
        expected = read_sidecar(path).get("output_sha256")
        if expected:
            _verify(sha256_file(path), expected, str(path))
    return to_state_dict(read_checkpoint(path, ".safetensors"), str(path))
