"""The `lfmodel` command: sweep, server, study, ui (the make targets are thin wrappers).

    lfmodel sweep -S 'lambda_entropy=0,0.01' -S surge.mode=static,rigl --seeds 0-2 --name s1
    lfmodel sweep ... --backend ray --address HEAD:6379      # needs MLFLOW_TRACKING_URI
    lfmodel server --data DIR [--port P] [--db-uri postgresql://...]
    lfmodel study [--study-id ID] [--full] [--minutes 90] [-j N] [--report-only]  # = make study
    lfmodel ui [--port P]                                    # = make ui

Bad input is one line on stderr and exit code 2, with nothing queued.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from lfmodel import server, study, sweep, tracking
from lfmodel.config import ParamsError, load_params


def _check_int(flag: str, value: int, low: int, high: int | None = None) -> None:
    """argparse only checks for an int: -j 0 hung (DVC starts no worker) and a port outside
    1-65535 ended in a traceback. So: SweepError (one line, exit 2) before anything starts."""
    if value < low or (high is not None and value > high):
        bound = f"at least {low}" if high is None else f"in {low}-{high}"
        raise sweep.SweepError(f"{flag} must be {bound}, got {value}")


def _sweep(args: argparse.Namespace) -> int:
    _check_int("-j/--jobs", args.jobs, 1)
    load_params()  # the file the sweep reads (check_grid, run_*): missing or bad is one line
    pairs = [sweep.parse_axis(s) for s in args.S]
    if args.seeds:
        pairs.append(("seed", sweep.parse_seeds(args.seeds)))
    fixed = {}
    for s in args.set:
        key, vals = sweep.parse_axis(s)
        if len(vals) != 1:
            raise sweep.SweepError(f"--set {s!r}: one value (use -S for a grid axis)")
        pairs.append((key, vals))
        fixed[key] = vals[0]
    keys = [k for k, _ in pairs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:  # a dict would keep the last one without a word
        raise sweep.SweepError(f"{', '.join(twice)} given more than once (-S, --set, --seeds): "
                               "one axis per key, its values comma-separated")
    axes = {k: v for k, v in pairs if k not in fixed}
    grid = sweep.Grid(axes, fixed)
    sweep_id = args.name or time.strftime("sweep%m%d%H%M")
    if args.backend == "ray":
        missing = sweep.run_ray(sweep_id, grid, args.address)
    else:
        missing = sweep.run_local(sweep_id, grid, args.jobs)
    return 1 if missing else 0


def _server(args: argparse.Namespace) -> int:
    _check_int("--port", args.port, 1, 65535)
    server.serve(Path(args.data), port=args.port, db_uri=args.db_uri)
    return 0


def _ui(args: argparse.Namespace) -> int:
    _check_int("--port", args.port, 1, 65535)
    try:
        cmd = tracking.ui_command("127.0.0.1", args.port)
    except ValueError as err:  # a server URI: it has its own UI
        raise sweep.SweepError(str(err)) from None
    return subprocess.call(cmd)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="lfmodel", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    sw = sub.add_parser("sweep", help="a grid of DVC experiments (local DVC queue or Ray)",
                        description=sweep.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sw.add_argument("-S", action="append", default=[], metavar="KEY=V1,V2",
                    help="a grid axis (repeat: cartesian product)")
    sw.add_argument("--seeds", help="seed axis: A-B or A,B,C")
    sw.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a value for every point, not part of the names")
    sw.add_argument("--name", help="sweep id (reuse it to resume); default sweepMMDDHHMM")
    sw.add_argument("--backend", choices=("local", "ray"), default="local")
    sw.add_argument("-j", "--jobs", type=int, default=2, help="local: parallel queue workers")
    sw.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                    help="ray: cluster address HEAD:6379 (default $RAY_ADDRESS)")
    sw.set_defaults(fn=_sweep)

    sv = sub.add_parser("server", help="MLflow tracking server on PostgreSQL")
    sv.add_argument("--data", required=True, help="folder for the database and artifacts")
    sv.add_argument("--port", type=int, default=server.PORT)
    sv.add_argument("--db-uri", help="an existing PostgreSQL (postgresql://user@host:port/db)")
    sv.set_defaults(fn=_server)

    st = sub.add_parser("study", help="the study grid and report (make study)", add_help=False)
    st.set_defaults(fn=None)

    ui = sub.add_parser("ui", help="MLflow UI on 127.0.0.1 against the project's store")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(fn=_ui)

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["study"]:
        study.main(argv[1:])
        return
    args = ap.parse_args(argv)
    try:
        code = args.fn(args)
    except (sweep.SweepError, server.ServerError, ParamsError) as err:  # as study.main
        print(f"lfmodel {args.command}: {err}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
