"""The `tito` command line: one subcommand per step of the course workflow."""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import textwrap
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


def _pytest_paths(arguments: list[str]) -> tuple[list[str], list[str]]:
    """Split pytest arguments into test paths (made absolute: pytest runs in the workspace root)
    and everything else. A path is an argument naming an existing file or folder, with or without
    a `::test_name` suffix."""
    paths, others = [], []
    for argument in arguments:
        path, separator, rest = argument.partition("::")
        if not argument.startswith("-") and path and Path(path).exists():
            paths.append(str(Path(path).resolve()) + separator + rest)
        else:
            others.append(argument)
    return paths, others


def _run_pytest(module, part: str | None, verbose: bool, arguments: list[str]) -> int:
    """pytest's own output: on the module's tests, or only on the test paths given after --."""
    from tito.grading_plugin import MODULE_ENV, PACKAGE_ENV, PART_ENV, REPORT_ENV

    paths, others = _pytest_paths(arguments)
    command = [sys.executable, "-m", "pytest", *(paths or [str(module.tests)]), "-p", "tito.grading_plugin",
               *(["-v"] if verbose else []), *others]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(module.root)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    # The plugin checks that the tests import this workspace's package, and selects the part.
    env.update({PACKAGE_ENV: str(module.root / "tinytorch"), MODULE_ENV: f"tinytorch.core.{module.name}"})
    env.pop(REPORT_ENV, None)
    env.pop(PART_ENV, None)
    if part is not None:
        env[PART_ENV] = part
    return subprocess.call(command, cwd=module.root, env=env)


def cmd_test(args: argparse.Namespace) -> int:
    from tito.freshness import export_if_changed
    from tito.grade import format_summary, grade, graded_parts, select_part

    root = find_root()
    module = resolve_module(root, args.module)
    if not module.tests.is_dir():
        raise TitoError(f"module {module.folder_name} has no tests folder {module.relative(module.tests)}")
    graded = any(not part.manual for part in graded_parts(module))
    if args.part is not None and not graded:
        raise TitoError(f"{module.folder_name} has no graded parts to choose from; "
                        f"run all its tests with `tito test {module.number}`", exit_code=2)
    part = select_part(module, args.part) if args.part is not None else None
    for line in export_if_changed(root, "test", force=args.force):
        print(line, flush=True)
    if args.verbose or args.pytest_args or not graded:
        return _run_pytest(module, part, args.verbose, args.pytest_args)
    result = grade(root, args.module, timeout=args.timeout, part=part)
    print(format_summary(result, module.relative(module.source), selected=part is not None))
    ungraded = result["ungraded"]
    return 0 if result["all_passed"] and ungraded["passed"] == ungraded["tests"] else 1


def cmd_run(args: argparse.Namespace) -> int:
    from tito.run import run_module

    root = find_root()
    return run_module(resolve_module(root, args.module), figures_dir=args.figures, timeout=args.timeout,
                      json_path=args.json)


def cmd_release(args: argparse.Namespace) -> int:
    from tito.release import DEFAULT_OUT, release

    root = find_root()
    module = resolve_module(root, args.module)
    out = args.out if args.out is not None else root / DEFAULT_OUT
    for line in release(root, module, out, force=args.force):
        print(line)
    print("made with nbgrader's preprocessors: solutions stripped (ClearSolutions), test and provided cells "
          "locked (LockCells), checksums recorded (ComputeChecksums), outputs cleared (ClearOutput); student files: "
          f"{out / module.relative(module.notebook)} and {out / module.relative(module.source)}")
    return 0


def cmd_grade(args: argparse.Namespace) -> int:
    import json

    from tito.freshness import export_if_changed
    from tito.grade import format_report, grade

    root = find_root()
    module = resolve_module(root, args.module)
    to_stdout = args.json is not None and str(args.json) == "-"
    if args.package is None:                      # grading this workspace: never its stale package
        for line in export_if_changed(root, "grade", force=args.force):
            print(line, file=sys.stderr if to_stdout else sys.stdout, flush=True)
    result = grade(root, args.module, args.package, timeout=args.timeout)
    print(format_report(result, module.relative(module.source)), file=sys.stderr if to_stdout else sys.stdout)
    if to_stdout:
        print(json.dumps(result, indent=2))
    elif args.json is not None:
        _write_json(args.json, result)
    return 0 if result["all_passed"] else 1

def _positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _write_json(path: Path, data) -> None:
    """A command's --json output, or a clear error when the file cannot be written."""
    import json

    try:
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    except OSError as error:
        raise TitoError(f"cannot write --json {path}: {error}") from error
    print(f"wrote {path}")


def _require_course_tool(name: str) -> None:
    """Stop with a clear message where a course tool (not shipped in a student workspace) is missing."""
    if importlib.util.find_spec(f"tito.{name}") is None:
        raise TitoError(f"tito {name} is a course tool: it is not part of a student workspace")


def cmd_mutate(args: argparse.Namespace) -> int:
    _require_course_tool("mutate")
    from tito.mutate import format_footer, format_header, format_result, mutate

    root = find_root()
    summary = mutate(root, args.module, only=args.only, timeout=args.timeout,
                     on_start=lambda source, count: print(format_header(source, count), flush=True),
                     on_result=lambda result: print(format_result(result), flush=True))
    print(format_footer(summary))
    if args.json is not None:
        _write_json(args.json, summary)
    return 0 if summary["all_caught"] else 1


def cmd_bench(args: argparse.Namespace) -> int:
    _require_course_tool("bench")
    from tito.bench import (backward_check, format_ablation, format_backward_check, format_profiler_check,
                            format_table, plot_sweep, profiler_check, run_ablation, run_bench)

    if args.ablation:
        result = run_ablation(quick=args.quick, pairs=args.pairs)
        print(format_ablation(result))
        if args.json is not None:
            _write_json(args.json, result)
        return 0
    if args.backward:
        check = backward_check()
        print(format_backward_check(check))
        if args.json is not None:
            _write_json(args.json, check)
        return 0 if check["passed"] else 1
    if args.profiler_check:
        check = profiler_check(load=not args.no_load)
        print(format_profiler_check(check))
        if args.json is not None:
            _write_json(args.json, check)
        return 0 if check["passed"] else 1
    result = run_bench(quick=args.quick, rounds=args.rounds)
    print(format_table(result))
    if args.json is not None:
        _write_json(args.json, result)
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
        "test", help="run a module's tests and summarise them per part",
        description=textwrap.fill(
            "Run the module's tests (tests/NN_name) against this workspace's package and print, for each "
            "graded part, the tests passed and either 'ok', 'not done yet' (a stub still raises "
            "NotImplementedError) or its first failure, pointing at your line in the module's *_dev.py. "
            "If the module's .py or notebook changed since the last export, it is exported first.", 90),
        epilog="examples:\n"
        "  tito test 13                       every part, summarised\n"
        "  tito test 13 masked-softmax        one part (its name in the summary, or its grade_id)\n"
        "  tito test 13 masked_softmax        the part that tests this function or class\n"
        "  tito test 13 -v                    pytest's full output\n"
        "  tito test 13 -- -x -k causal       pytest's full output with these pytest arguments\n"
        "  tito test 13 -- tests/13_attention/test_masked_softmax.py   only this test file",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    test.add_argument("module", help=MODULE_HELP)
    test.add_argument("part", nargs="?", default=None,
                      help="run one part's tests only: a part name such as masked-softmax, or a function name")
    test.add_argument("-v", "--verbose", action="store_true", help="show pytest's full output instead of the summary")
    test.add_argument("--timeout", type=float, default=600,
                      help="seconds the tests may run for the summary; unfinished tests count as failed (default: 600)")
    test.add_argument("--force", action="store_true",
                      help="export even over edited generated files, keeping them as .bak copies (as tito export --force)")
    test.set_defaults(handler=cmd_test, pytest_args=[])

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
    run.add_argument("--json", type=Path, default=None, metavar="PATH",
                     help="also write each code cell's wall time (seconds) as JSON to PATH")
    run.set_defaults(handler=cmd_run)

    release = commands.add_parser(
        "release", help="write the student version of a module, solutions stripped",
        description="Write a self-contained student workspace: the module's notebook and .py made by "
        "nbgrader's own preprocessors (every solution region replaced by a stub, test and provided cells "
        "locked, checksums recorded), the modules before it, their tests, the package exported from them "
        "and the tito tools. Needs nbgrader: pip install -e \".[instructor]\". Existing files are never "
        "overwritten without --force, and with --force changed files are kept as .bak copies.",
    )
    release.add_argument("module", help=MODULE_HELP)
    release.add_argument("--out", type=Path, default=None, help="workspace to write (default: ./release)")
    release.add_argument("--force", action="store_true", help="write into a folder that already holds release files")
    release.set_defaults(handler=cmd_release)

    grade = commands.add_parser(
        "grade", help="grade an exported package and print the points per part",
        description="Run this workspace's grading tests for the module against one exported package "
        "and print part, points earned and points possible, the first failure of each part at the "
        "student's own line, and the written answers still to fill in. Without --package, a module "
        "changed since the last export is exported first; a --package is graded as it is. Exit "
        "status 0 only when every test passed.",
    )
    grade.add_argument("module", help=MODULE_HELP)
    grade.add_argument("--package", type=Path, default=None,
                       help="the tinytorch folder to grade, or a workspace holding one (default: this workspace's)")
    grade.add_argument("--json", type=Path, default=None, metavar="PATH",
                       help="also write the result as JSON to PATH ('-': JSON on standard output, the table on standard error)")
    grade.add_argument("--timeout", type=float, default=600,
                       help="seconds the tests may run in all; unfinished tests count as failed (default: 600)")
    grade.add_argument("--force", action="store_true",
                       help="export even over edited generated files, keeping them as .bak copies (as tito export --force)")
    grade.set_defaults(handler=cmd_grade)

    mutate = commands.add_parser(
        "mutate", help="check that the graded tests catch each realistic bug of the module's mutation table",
        description=textwrap.fill(
            "For each mutation in modules/NN_name/mutations.toml (a name, the grade_id of the part it should "
            "cost, and a find/replace inside a solution region of the module's *_dev.py): apply it in a scratch "
            "copy of the workspace, export, run that part's graded tests, and report the points the part keeps. "
            "A mutation is caught when it keeps less than half of them. Exit status 1 when any mutation is "
            "not caught. The table is instructor-side: tito release never ships it.", 90),
    )
    mutate.add_argument("module", help=MODULE_HELP)
    mutate.add_argument("--only", default=None, metavar="SUBSTRING",
                        help="run only the mutations whose name contains SUBSTRING (case-insensitive)")
    mutate.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON")
    mutate.add_argument("--timeout", type=float, default=300,
                        help="seconds one mutation's tests may run; unfinished tests count as failed (default: 300)")
    mutate.set_defaults(handler=cmd_mutate)

    bench = commands.add_parser(
        "bench", help="time attention against PyTorch on the CPU, each in its own process",
        description="Run the attention workloads (SDPA, multi-head, causal, generation with and "
        "without the KV cache, blocked vs plain, a sequence-length sweep) with the tuned kernel switched "
        "on, and PyTorch's when it is installed, each side in fresh worker processes at its library's "
        "defaults, alternating rounds; print medians, ratios with their spread and the fraction of the "
        "machine's matmul peak.",
    )
    bench.add_argument("--quick", action="store_true", help="small sizes that run in seconds (a smoke test)")
    bench.add_argument("--rounds", type=_positive_int, default=None, metavar="N",
                       help="alternating rounds of worker processes (default 5, 2 with --quick)")
    bench.add_argument("--ablation", action="store_true",
                       help="instead: switch each technique of the tuned kernel off in turn and print its gain "
                       "on the goal rows, beside a control row that runs the same techniques on both sides")
    bench.add_argument("--pairs", type=_positive_int, default=None, metavar="N",
                       help="with --ablation: alternating pairs of blocks of runs with and without each technique, "
                       "per goal row (default 9, 2 with --quick); fewer than 5 give the gains but no verdict")
    bench.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON")
    bench.add_argument("--plot", type=Path, default=None, metavar="PATH",
                       help="also save the sweep's log-log plot as a PNG (needs matplotlib)")
    bench.add_argument("--profiler-check", action="store_true",
                       help="instead: with one core kept busy by another process, check three times that "
                       "AttentionProfiler fits the math path's time exponent in [1.7, 2.3] and memory in [1.8, 2.2]")
    bench.add_argument("--no-load", action="store_true", help="with --profiler-check: do not start the busy process")
    bench.add_argument("--backward", action="store_true",
                       help="instead: Part 11's goals at T = 2048, 8 heads of 64: the recomputing backward's memory "
                       "against the backward from saved weights, and its time against the blocked forward")
    bench.set_defaults(handler=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    passed_on = []                                  # what follows `--` goes to pytest, untouched
    if "--" in argv:
        split = argv.index("--")
        argv, passed_on = argv[:split], argv[split + 1:]
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if passed_on:
        if args.command != "test":
            parser.error(f"arguments after -- are passed to pytest by `tito test` only, not by `tito {args.command}`")
        args.pytest_args = passed_on
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
