"""The command line of every entry point: `--help`, key=value parsing and one error policy.

    def main(argv=None):
        cli(run, argv, doc=__doc__, schema=RunConfig)

`--help` / `-h` prints the entry point's usage docstring and every config key with its default and the comment
written next to it in the schema. A bad input, or a failure the run can name (a full disk, a non-finite loss, a
dead worker), exits with one line `error: <what is wrong and what is allowed>` on stderr, status 2 for a bad input
(the SLURM scripts do not requeue it) and 1 for a failure; anything else is a bug and keeps its traceback. The
runner's result is printed as one JSON line (a string as it is); a run's verdict line (its `verdict` key,
`nayer.verdict`) comes after it, the last line of the output.
"""

from __future__ import annotations

import errno
import json
import sys
from typing import Any, Callable, Sequence

from nayer.cli_config import ConfigError, describe_keys, parse_config
from nayer.runtime import RunError, first_line

USER_ERRORS = (ConfigError, OSError, ValueError, RunError)  # reported in one line; anything else is a bug
HELP_FLAGS = ("-h", "--help")
EXIT_BAD_INPUT = 2  # a bad input (the command line, a config file, a path): running it again fails the same way


class ErrorExit(SystemExit):
    """Exit with `status`; str() is the one-line `message` (cli prints it on stderr), for callers in-process."""

    def __init__(self, message: str, status: int):
        super().__init__(status)
        self.message = message

    def __str__(self) -> str:
        return self.message


def one_line(exc: BaseException) -> str:
    """The first line of an error's message (ours are one line; an OS error adds what the disk said)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full: {exc}; free space and run again with resume=true"
    return first_line(exc)


def help_text(doc: str, sections: Sequence[tuple[str, type]]) -> str:
    """The usage docstring, then per schema its keys as `key = default  comment` (prefix: e.g. `sweep.`)."""
    lines = [(doc or "").strip(), ""]
    for prefix, schema in sections:
        keys = [(f"{prefix}{key}", repr(default), comment) for key, default, comment in describe_keys(schema)]
        width = min(max(len(k) + len(d) for k, d, _ in keys) + 3, 60)
        lines.append(f"keys {prefix}*:" if prefix else
                     "config keys (config=a.yaml,b.yaml merged left to right, then key=value overrides):")
        for key, default, comment in keys:
            entry = f"  {key} = {default}"
            lines.append(f"{entry:<{width + 2}}  {comment}".rstrip() if comment else entry)
        lines.append("")
    return "\n".join(lines)


def cli(runner: Callable[[Any], Any], argv: Sequence[str] | None = None, *, doc: str, schema: type,
        parse: Callable[[list[str]], Any] | None = None, more_keys: Sequence[tuple[str, type]] = (),
        positional: str = "", explain: Callable[[BaseException], BaseException] = lambda exc: exc) -> None:
    """Parse `argv` (default: the command line) and call `runner` with the result; print it as one JSON line.

    `parse` replaces `parse_config(schema, args)` (the sweep's split of its own keys; an example's fixed config
    files); `more_keys` adds (prefix, schema) sections to --help; `positional` names the key a lone argument
    without `=` sets (`python -m nayer.report runs/<name>`); `explain` finds the error inside wrappers (Ray's task
    and worker-group errors)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in HELP_FLAGS for a in args):
        print(help_text(doc, [("", schema), *more_keys]))
        return
    if positional:
        args = [a if "=" in a else f"{positional}={a}" for a in args]
    try:
        result = runner(parse(args) if parse is not None else parse_config(schema, args))
    except Exception as exc:  # noqa: BLE001 - filtered: only USER_ERRORS become one line
        root = explain(exc)
        if not isinstance(root, USER_ERRORS):
            raise
        message = f"error: {one_line(root)}"
        print(message, file=sys.stderr, flush=True)
        raise ErrorExit(message, EXIT_BAD_INPUT if isinstance(root, ConfigError) else 1) from None
    if result is not None:
        print(result if isinstance(result, str) else json.dumps(result))
    if isinstance(result, dict) and result.get("verdict"):
        print(result["verdict"])
