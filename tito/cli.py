"""The `tito` command line: one subcommand per step of the course workflow."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from tito.workspace import TitoError, find_root, resolve_module, select_modules

MODULE_HELP = "module number or name: 13, 13_attention or attention"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tinytorch")
    except PackageNotFoundError:  # running from a checkout that was never installed
        return "unknown"


def cmd_export(args: argparse.Namespace) -> int:
    from tito.export import export

    root = find_root()
    plan = export(root, select_modules(root, args.module), force=args.force)
    for line in plan.notes:
        print(line)
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


def cmd_release(args: argparse.Namespace) -> int:
    from tito.release import DEFAULT_OUT, nbgrader_available, release

    root = find_root()
    module = resolve_module(root, args.module)
    out = args.out if args.out is not None else root / DEFAULT_OUT
    for line in release(root, module, out, force=args.force):
        print(line)
    tool = "nbgrader's ClearSolutions" if nbgrader_available() else "tito's ClearSolutions (nbgrader not installed)"
    print(f"solutions stripped with {tool}; student files: "
          f"{out / module.relative(module.notebook)} and {out / module.relative(module.source)}")
    return 0


def cmd_grade(args: argparse.Namespace) -> int:
    import json

    from tito.grade import format_report, grade

    root = find_root()
    result = grade(root, args.module, args.package, timeout=args.timeout)
    module = resolve_module(root, args.module)
    to_stdout = args.json is not None and str(args.json) == "-"
    print(format_report(result, module.relative(module.source)), file=sys.stderr if to_stdout else sys.stdout)
    if to_stdout:
        print(json.dumps(result, indent=2))
    elif args.json is not None:
        try:
            args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        except OSError as error:
            raise TitoError(f"cannot write --json {args.json}: {error}") from error
        print(f"wrote {args.json}")
    return 0 if result["all_passed"] else 1


def cmd_bench(args: argparse.Namespace) -> int:
    import json

    from tito.bench import format_profiler_check, format_table, plot_sweep, profiler_check, run_bench

    if args.profiler_check:
        check = profiler_check(load=not args.no_load)
        print(format_profiler_check(check))
        if args.json is not None:
            args.json.write_text(json.dumps(check, indent=2) + "\n", encoding="utf-8")
        return 0 if check["passed"] else 1
    result = run_bench(quick=args.quick)
    print(format_table(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    if args.plot is not None:
        plot_sweep(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tito",
        description="TinyTorch course tools: export modules, run their notebooks, test and grade them.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

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
        description="Execute the module cell by cell in a fresh ipykernel: its *_dev.py source, or its "
        "notebook when that was edited since the last export. The kernel imports this workspace's "
        "tinytorch. Prints what each cell prints, saves its plots, and stops at the first error.",
    )
    run.add_argument("module", help=MODULE_HELP)
    run.add_argument("--figures", type=Path, default=None,
                     help="folder for the plots the notebook draws (default: tito-output/NN_name)")
    run.add_argument("--timeout", type=int, default=900, help="seconds allowed per cell (default: 900)")
    run.set_defaults(handler=cmd_run)

    release = commands.add_parser(
        "release", help="write the student version of a module, solutions stripped",
        description="Write a self-contained student workspace: the module's notebook and .py with every "
        "solution region replaced by a stub (nbgrader's ClearSolutions semantics), the modules before "
        "it, their tests, the package exported from them and the tito tools. Existing files are never "
        "overwritten without --force, and with --force changed files are kept as .bak copies.",
    )
    release.add_argument("module", help=MODULE_HELP)
    release.add_argument("--out", type=Path, default=None, help="workspace to write (default: ./release)")
    release.add_argument("--force", action="store_true", help="write into a folder that already holds release files")
    release.set_defaults(handler=cmd_release)

    grade = commands.add_parser(
        "grade", help="grade an exported package and print the points per part",
        description="Run this workspace's grading tests for the module against one exported package "
        "and print part, points earned and points possible. Exit status 0 only when every test passed.",
    )
    grade.add_argument("module", help=MODULE_HELP)
    grade.add_argument("--package", type=Path, default=None,
                       help="the tinytorch folder to grade, or a workspace holding one (default: this workspace's)")
    grade.add_argument("--json", type=Path, default=None, metavar="PATH",
                       help="also write the result as JSON to PATH ('-': JSON on standard output, the table on standard error)")
    grade.add_argument("--timeout", type=float, default=600,
                       help="seconds the tests may run in all; unfinished tests count as failed (default: 600)")
    grade.set_defaults(handler=cmd_grade)

    bench = commands.add_parser(
        "bench", help="time attention side by side with PyTorch on the CPU",
        description="Run the attention workloads (SDPA, multi-head, causal, generation with and "
        "without the KV cache, blocked vs plain, a sequence-length sweep) beside PyTorch when it "
        "is installed, and print medians, ratios and the fraction of the machine's matmul peak.",
    )
    bench.add_argument("--quick", action="store_true", help="small sizes that run in seconds (a smoke test)")
    bench.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON")
    bench.add_argument("--plot", type=Path, default=None, metavar="PATH",
                       help="also save the sweep's log-log plot as a PNG (needs matplotlib)")
    bench.add_argument("--profiler-check", action="store_true",
                       help="instead: with one core kept busy by another process, check three times that "
                       "AttentionProfiler fits the math path's time exponent in [1.7, 2.3] and memory in [1.8, 2.2]")
    bench.add_argument("--no-load", action="store_true", help="with --profiler-check: do not start the busy process")
    bench.set_defaults(handler=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
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
