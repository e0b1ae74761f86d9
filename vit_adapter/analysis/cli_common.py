"""What the three analysis entry points (aggregate, plots, report) share: their parser, their input flags and
their contract with DVC and the user (print each written path; a bad input is one ``error:`` line and exit 2)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

# A missing result file, a malformed run/registry/JSON (all ValueErrors, JSONDecodeError included) or a missing
# key in a result file: the user's input is wrong, not the code, so the CLI answers in one line with exit 2.
INPUT_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, ValueError, KeyError)


def analysis_parser(module: str, doc: str | None) -> argparse.ArgumentParser:
    """A parser for ``python -m vit_adapter.analysis.<module>`` described by the first line of its docstring, with
    the flags every analysis step takes: the paper numbers and the ablation registry. Each flag's ``dest`` is the
    step function's parameter name, so ``main`` calls it as ``step(**vars(args))``."""
    p = argparse.ArgumentParser(prog=f"python -m vit_adapter.analysis.{module}", description=(doc or "").split("\n")[0])
    p.add_argument(
        "--paper",
        dest="paper_path",
        type=Path,
        default=None,
        help="paper numbers YAML (default ablations/paper_numbers.yml)",
    )
    p.add_argument(
        "--registry",
        dest="registry_path",
        type=Path,
        default=None,
        help="ablation registry (default ablations/index.yml)",
    )
    return p


def _message(err: BaseException) -> object:
    # str(KeyError('x')) is "'x'" with quotes; its argument is the readable message.
    return err.args[0] if isinstance(err, KeyError) and err.args else err


def run_step(write: Callable[[], Path | Sequence[Path]]) -> int:
    """Run `write`, print the path(s) it wrote one per line and return 0; on bad input print ``error: …`` to
    stderr and return 2. Writers write through temp paths, so nothing is half-written either way."""
    try:
        written = write()
    except INPUT_ERRORS as err:
        print(f"error: {_message(err)}", file=sys.stderr)
        return 2
    for path in [written] if isinstance(written, Path) else written:
        print(path)
    return 0
