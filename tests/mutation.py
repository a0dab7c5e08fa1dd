"""Per-module mutation scores from the last `mutmut run` (what `make mutation` prints).

mutmut 3 keeps each source file's results in `mutants/<path>.meta` (JSON, its
`exit_code_by_key` maps a mutant's name to the test run's exit code) and prints
one total only. This reads those files and prints, per mutated module, killed /
total, the score and how many of the killed mypy refused before any test ran;
then each mutant neither killed nor explained in `tests/MUTATION.md` (as
equivalent or harmless), and the modules under `TARGET`. Exits 1 while such an
unexplained survivor remains: each one gets a test or an entry there.

The score is killed / (total - equivalent), the usual mutation score: an
equivalent mutant (a row of MUTATION.md whose reason starts "Equivalent") is
the same program, which no test can tell apart. The raw killed / total is
printed beside it.

    python tests/mutation.py            # after `mutmut run`, from the repository root
"""

from __future__ import annotations

import json
import re
import sys
import tomllib
from pathlib import Path

from mutmut.stats import status_by_exit_code

TARGET = 90.0  # percent of mutants killed, per module (docs/design.md)
# A mutant whose test run timed out was caught too: the mutation made the code hang.
CAUGHT = {"killed", "timeout", "caught by type check"}
_MUTANT = re.compile(r"relay(?:\.\w+)+?\.x\S*?__mutmut_\d+")
# A MUTATION.md row: | `name` | line | mutation | why |
_ROW = re.compile(
    r"^\|\s*`(relay(?:\.\w+)+?\.x\S*?__mutmut_\d+)`\s*\|[^|]*\|.*\|\s*(\w+)[^|]*\|\s*$"
)


def main(root: Path = Path()) -> int:
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["mutmut"]
    notes = root / "tests" / "MUTATION.md"
    text = notes.read_text() if notes.exists() else ""
    accepted = set(_MUTANT.findall(text))
    equivalent = {
        m.group(1)
        for line in text.splitlines()
        if (m := _ROW.match(line)) and m.group(2).lower() == "equivalent"
    }
    below = []
    survivors: list[str] = []
    print(
        f"{'module':<20} {'killed':>6} / {'total':<5} {'raw':>6}  {'equiv':>5}  {'score':>6}"
        "  by mypy  listed  unlisted"
    )
    for module in config["only_mutate"]:
        meta = root / "mutants" / f"{module}.meta"
        if not meta.exists():
            print(f"{module:<20} no results: run `mutmut run` first")
            below.append(module)
            continue
        statuses = {
            name: status_by_exit_code[code]
            for name, code in json.loads(meta.read_text())["exit_code_by_key"].items()
        }
        killed = sum(status in CAUGHT for status in statuses.values())
        total = len(statuses)
        raw = 100.0 * killed / total if total else 100.0
        same = sum(name in equivalent and statuses[name] not in CAUGHT for name in statuses)
        score = 100.0 * killed / (total - same) if total - same else 100.0
        alive = sorted(name for name, status in statuses.items() if status not in CAUGHT)
        by_mypy = sum(status == "caught by type check" for status in statuses.values())
        listed = sum(name in accepted for name in alive)
        unlisted = len(alive) - listed
        print(
            f"{module:<20} {killed:>6} / {total:<5} {raw:>5.1f}%  {same:>5}  {score:>5.1f}%"
            f"  {by_mypy:>7}  {listed:>6}  {unlisted:>8}"
        )
        if score < TARGET:
            below.append(module)
        survivors += [f"{name} ({statuses[name]})" for name in alive if name not in accepted]
    if survivors:
        print("\nnot killed and not in tests/MUTATION.md (`mutmut show NAME` prints the diff):")
        for survivor in survivors:
            print(f"  {survivor}")
    if below:
        print(f"\nunder the {TARGET:.0f}% target: {', '.join(below)}")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
