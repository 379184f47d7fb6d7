"""One table of every benchmark figure next to its target, from bench/results/*.json.

python -m bench.summary
"""

from __future__ import annotations

import json

from bench.common import RESULTS, markdown_table


def rows() -> list[list[str]]:
    out = []
    for path in sorted(RESULTS.glob("*.json")):
        record = json.loads(path.read_text())
        for t in record.get("targets", []):
            status = {True: "met", False: "**not met**", None: "-"}[t["met"]]
            out.append([path.stem, t["figure"], f"{t['value']:.3g}", t["target"], status, t.get("note", "")])
    return out


def main() -> None:
    print(markdown_table(["bench", "figure", "value", "target", "status", "note"], rows()))


if __name__ == "__main__":
    main()
