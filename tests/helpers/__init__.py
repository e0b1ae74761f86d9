def kill_after_iteration(n: int) -> dict[str, str]:
    """Environment for a child process whose training SIGKILLs itself after iteration ``n`` (killswitch/)."""
    import os
    from pathlib import Path

    here = str(Path(__file__).parent / "killswitch")
    return {
        "KILL_AFTER_ITER": str(n),
        "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])),
    }
