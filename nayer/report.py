"""The end-of-run report, rebuilt: metrics.jsonl -> report.md + plots/*.png, for either runner's run folder.

    python -m nayer.report runs/<name>          # (re)write runs/<name>/report.md and runs/<name>/plots/
    python -m nayer.report run=runs/<name>      # the same

Both runners write it when they finish (`nayer.run_report.finish_run`); this command rebuilds it for a run that was
stopped or is still going.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from nayer.cli import cli
from nayer.cli_config import ConfigError
from nayer.run_report import write_report


@dataclass
class ReportConfig:
    run: str = ""  # the run folder, <out_dir>/<name> of either runner

    def validate(self) -> None:
        if not self.run:
            raise ConfigError("no run folder: python -m nayer.report runs/<name>")


def main(argv: Sequence[str] | None = None) -> None:
    cli(lambda cfg: str(write_report(cfg.run)), argv, doc=__doc__, schema=ReportConfig, positional="run")


if __name__ == "__main__":
    main()
