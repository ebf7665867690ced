"""The `tito` command line: one subcommand per step of the course workflow."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from tito.workspace import TitoError, find_root, resolve_module, select_modules

MODULE_HELP = "module number or name: 13, 13_attention or attention"


def cmd_export(args: argparse.Namespace) -> int:
    from tito.export import export

    root = find_root()
    plan = export(root, select_modules(root, args.module), force=args.force)
    for line in plan.notes:
        print(line)
    if plan.conflicts:
        print("overwritten with --force:\n  " + "\n  ".join(plan.conflicts))
    if not any(note.startswith("wrote ") for note in plan.notes):
        print("export: everything already up to date")
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    root = find_root()
    module = resolve_module(root, args.module)
    if not module.tests.is_dir():
        raise TitoError(f"module {module.folder_name} has no tests folder {module.relative(module.tests)}")
    command = [sys.executable, "-m", "pytest", str(module.tests), *args.pytest_args]
    return subprocess.call(command, cwd=root)


def cmd_run(args: argparse.Namespace) -> int:
    from tito.run import run_module

    root = find_root()
    return run_module(resolve_module(root, args.module), figures_dir=args.figures, timeout=args.timeout)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tito",
        description="TinyTorch course tools: export modules, run their notebooks, test and grade them.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    export = commands.add_parser(
        "export", help="turn *_dev.py sources into notebooks and the tinytorch package",
        description="Convert each modules/NN_name/name_dev.py into its notebook (jupytext) and its "
        "package file tinytorch/core/name.py (nbdev). All modules when none is named.",
    )
    export.add_argument("module", nargs="?", help=MODULE_HELP + " (default: all modules)")
    export.add_argument("--force", action="store_true",
                        help="overwrite generated files even when they were edited by hand")
    export.set_defaults(handler=cmd_export)

    test = commands.add_parser(
        "test", help="run a module's tests with pytest",
        description="Run tests/NN_name with pytest. Arguments after -- go to pytest.",
    )
    test.add_argument("module", help=MODULE_HELP)
    test.add_argument("pytest_args", nargs=argparse.REMAINDER, help="extra pytest arguments")
    test.set_defaults(handler=cmd_test)

    run = commands.add_parser(
        "run", help="execute a module's notebook top to bottom in a Jupyter kernel",
        description="Execute the module's notebook, built from its *_dev.py source, cell by cell "
        "in a fresh ipykernel. Prints what each cell prints and stops at the first error.",
    )
    run.add_argument("module", help=MODULE_HELP)
    run.add_argument("--figures", type=Path, default=None,
                     help="folder for the plots the notebook draws (default: tito-output/NN_name)")
    run.add_argument("--timeout", type=int, default=900, help="seconds allowed per cell (default: 900)")
    run.set_defaults(handler=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "pytest_args", None) and args.pytest_args[0] == "--":
        args.pytest_args = args.pytest_args[1:]
    try:
        return args.handler(args)
    except TitoError as error:
        print(f"tito {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"tito {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
