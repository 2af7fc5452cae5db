"""``python -m cnnlab.report [--experiment NAME] [--parent RUN_ID[,RUN_ID...]|latest]
[--out DIR]``: the ablation report of a sweep, or of several pooled into one study, read back
from MLflow."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cnnlab import config
from cnnlab.cli import user_errors
from cnnlab.report.build import build_report
from cnnlab.tracking.store import connect, require_store


def main(argv: list[str] | None = None) -> None:
    script = Path(sys.argv[0]).name  # cnnlab-report, or __main__.py for python -m
    prog = "python -m cnnlab.report" if script == "__main__.py" else script
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("--experiment", help="the study (default: the newest sweep's)")
    parser.add_argument(
        "--parent",
        default="latest",
        help="the sweep's parent run id, or latest; several ids a,b pool their sweeps",
    )
    parser.add_argument("--out", type=Path, help="folder (default: reports/<experiment>)")
    parser.add_argument("--baseline", help="the group to compare with (default: the best)")
    parser.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{config.REPO_ROOT}/mlflow.db"),
        help="the MLflow store (default: $MLFLOW_TRACKING_URI or the project's mlflow.db)",
    )
    parser.add_argument("--no-attach", action="store_true", help="do not log it to the parent run")
    args = parser.parse_args(argv)
    with user_errors():
        require_store(args.tracking_uri, "cnnlab.report", "run a sweep first")
        page = build_report(
            connect(args.tracking_uri),
            args.experiment,
            args.parent,
            args.out,
            args.baseline,
            attach=not args.no_attach,
        )
    print(f"report: {page.resolve()}\nopen it: file://{page.resolve()}")


if __name__ == "__main__":
    main()
