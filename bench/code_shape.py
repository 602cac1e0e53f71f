"""The shape of the code, measured: the longest functions of nayer/ and orchestrator/, the places outside the
storage module that ask whether a location is a URL, and the message fields popped out of dicts on the driver's
result path, for this tree and (`--before`) an earlier commit.

    python -m bench.code_shape --before ea10e9a        # results/code-shape.md
    python -m bench.code_shape --top 15

Functions are measured as `wc -l` would count their lines (def to last line, docstring included). A URL check is
`is_url(...)` or `"://" in ...`; the storage module is where they belong (nayer/storage.py; orchestrator/storage.py in
commits that had it there). A field pop is `<dict>.pop("<literal key>", ...)` in the modules a round's result crosses (driver, board,
ranks, actors).
"""

from __future__ import annotations

import argparse
import ast
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PACKAGES = ("nayer", "orchestrator")
STORAGE_MODULES = ("nayer/storage.py", "orchestrator/storage.py")
RESULT_PATH = ("orchestrator/run.py", "orchestrator/board.py", "orchestrator/rank.py", "orchestrator/trainer.py",
               "orchestrator/rounds.py", "orchestrator/workers.py")


def sources(rev: str | None) -> dict[str, str]:
    """Every .py file of the packages: the working tree's, or commit `rev`'s."""
    if rev is None:
        return {p.relative_to(ROOT).as_posix(): p.read_text() for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "-r", "--name-only", rev, *PACKAGES],
                            capture_output=True, text=True, check=True).stdout.split()
    return {path: subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True, text=True,
                                 check=True).stdout for path in listed if path.endswith(".py")}


def functions(files: dict[str, str]) -> list[tuple[int, str]]:
    """(lines, "path:line name") of every function, longest first."""
    found = []
    for path, text in files.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((node.end_lineno - node.lineno + 1, f"{path}:{node.lineno} {node.name}"))
    return sorted(found, reverse=True)


def url_checks(files: dict[str, str]) -> list[str]:
    """Where code outside the storage module asks whether a location is a URL."""
    hits = []
    for path, text in files.items():
        if path in STORAGE_MODULES:
            continue
        for node in ast.walk(ast.parse(text)):
            is_url_call = isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) \
                == "is_url"
            scheme_test = isinstance(node, ast.Compare) and isinstance(node.left, ast.Constant) \
                and node.left.value == "://" and any(isinstance(op, ast.In) for op in node.ops)
            if is_url_call or scheme_test:
                hits.append(f"{path}:{node.lineno}")
    return hits


def field_pops(files: dict[str, str]) -> list[str]:
    """`<dict>.pop("<key>")` calls on the result path: a message read by taking its fields out of a dict."""
    hits = []
    for path in RESULT_PATH:
        for node in ast.walk(ast.parse(files.get(path, ""))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "pop" and node.args \
                    and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                hits.append(f"{path}:{node.lineno} pop({node.args[0].value!r})")
    return hits


def shape(rev: str | None, top: int) -> dict:
    files = sources(rev)
    longest = functions(files)
    return {"label": rev or "this tree", "longest": longest[:top], "over_60": [f for f in longest if f[0] > 60],
            "url_checks": url_checks(files), "field_pops": field_pops(files)}


def report(shapes: list[dict]) -> str:
    lines = ["# The shape of the code", "", "`python -m bench.code_shape" + (f" --before {shapes[0]['label']}`"
                                                                          if len(shapes) > 1 else "`"), "",
             "| | " + " | ".join(s["label"] for s in shapes) + " |", "|---|" + "---|" * len(shapes),
             "| functions over 60 lines | " + " | ".join(str(len(s["over_60"])) for s in shapes) + " |",
             "| URL checks outside the storage module | " + " | ".join(str(len(s["url_checks"])) for s in shapes)
             + " |",
             "| message fields popped on the driver's result path | "
             + " | ".join(str(len(s["field_pops"])) for s in shapes) + " |"]
    for s in shapes:
        lines += ["", f"## {s['label']}", "", "Longest functions (lines, `wc -l` of def to end):", ""]
        lines += [f"- {n} {where}" for n, where in s["longest"]]
        lines += ["", "URL checks outside the storage module: " + (", ".join(s["url_checks"]) or "none"),
                  "", "Message fields popped on the result path: " + (", ".join(s["field_pops"]) or "none")]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default="", help="an earlier commit to measure beside this tree")
    ap.add_argument("--top", type=int, default=10, help="how many of the longest functions to list")
    args = ap.parse_args()
    shapes = ([shape(args.before, args.top)] if args.before else []) + [shape(None, args.top)]
    text = report(shapes)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "code-shape.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
