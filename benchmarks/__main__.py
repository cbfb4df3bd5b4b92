"""python -m benchmarks NAME [ARGS]: run benchmarks/NAME.py with ARGS; without a NAME, list them."""

from __future__ import annotations

import ast
import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def scripts() -> dict[str, str]:
    """Every benchmark script by name, with the first line of its docstring."""
    found = {}
    for path in sorted(HERE.glob("*.py")):
        if not path.stem.startswith("_"):
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            found[path.stem] = doc.splitlines()[0] if doc else ""
    return found


def main(argv: list[str]) -> int:
    known = scripts()
    if not argv or argv[0] not in known:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"no benchmark {argv[0]!r}", file=sys.stderr)
        print("usage: python -m benchmarks NAME [ARGS]   (NAME --help for its options)\n")
        width = max(map(len, known))
        print("\n".join(f"  {name:{width}}  {line}" for name, line in known.items()))
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    sys.path.insert(0, str(HERE))  # the scripts import their helpers (_common, serve_load) as top-level modules
    script = HERE / f"{argv[0]}.py"
    sys.argv = [str(script), *argv[1:]]
    runpy.run_path(str(script), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
