"""Run benchmarks by name: `python benchmarks/run.py loader [name ...] [-- args for them]`.

Each name runs `benchmarks/bench_<name>.py` in its own Python process (so one benchmark's
memory and threads do not colour the next); each prints a Markdown table for
docs/benchmarks.md. Without names, every benchmark runs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def available() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))


def main(argv: list[str]) -> int:
    names, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv \
        else (argv, [])
    names = names or available()
    unknown = [n for n in names if n not in available()]
    if unknown:
        print(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(available())}",
              file=sys.stderr)
        return 2
    status = 0
    for name in names:
        print(f"\n### {name}\n", flush=True)
        result = subprocess.run([sys.executable, str(HERE / f"bench_{name}.py"), *extra])
        status = status or result.returncode
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
