"""`tito mutate`: do the graded tests catch realistic bugs?

A module may keep a table of single, realistic bugs beside its source, in
`modules/NN_name/mutations.toml` (instructor-side: `tito release` never ships it):

    [[mutation]]
    name = "masked softmax: fully masked row divides by zero"
    part = "test-masked-softmax"        # the grade_id of the part the bug should cost
    find = '''exact text inside a solution region of the module's *_dev.py'''
    replace = '''the buggy text'''

For each mutation, in a scratch copy of the workspace, the text is replaced in the module's source
(it must occur exactly once, inside a `### BEGIN SOLUTION` / `### END SOLUTION` region), the
module is exported, and only the tests of that part are run, through `tito grade`'s own machinery.
The rule: a mutation must keep less than half of its part's points (KEEP_LIMIT). Before any
mutation, the unmutated source must earn every point of the parts involved, or the figures would
mean nothing.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from tito.export import export, write_atomic
from tito.grade import grade, graded_parts
from tito.release import BEGIN_SOLUTION, END_SOLUTION
from tito.workspace import Module, TitoError, resolve_module

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

MUTATIONS_FILE = "mutations.toml"   # beside the module's source; instructor-side only
KEEP_LIMIT = 0.5                    # a mutation is caught when it keeps less than this share of its part's points
FIELDS = ("name", "part", "find", "replace")
COPIED = ["pyproject.toml", "module.yaml", "modules", "tinytorch", ".tito"]   # what export and grading read


@dataclass(frozen=True)
class Mutation:
    name: str
    part: str       # grade_id of the auto-graded part whose points the bug should cost
    find: str       # text inside a solution region, found exactly once in the source
    replace: str    # the buggy text


def mutations_path(module: Module) -> Path:
    return module.folder / MUTATIONS_FILE


def load_mutations(module: Module) -> list[Mutation]:
    """The module's mutation table, checked: every field a string, names unique, parts auto-graded."""
    path = mutations_path(module)
    shown = module.relative(path)
    if not path.is_file():
        raise TitoError(f"{shown} does not exist: it holds the mutations to check, one [[mutation]] table each "
                        f"with {', '.join(FIELDS)}")
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise TitoError(f"{shown} is not valid TOML: {error}") from error
    entries = table.get("mutation")
    if not isinstance(entries, list) or not entries or set(table) != {"mutation"}:
        raise TitoError(f"{shown} must hold only [[mutation]] tables, at least one")
    parts = {part.grade_id for part in graded_parts(module) if not part.manual}
    mutations, names = [], set()
    for number, entry in enumerate(entries, start=1):
        if (set(entry) != set(FIELDS) or not all(isinstance(entry[key], str) for key in FIELDS)
                or not all(entry[key] for key in ("name", "part", "find"))):
            raise TitoError(f"{shown}, mutation {number}: expected the strings {', '.join(FIELDS)} (only replace may "
                            f"be empty, to delete the text), got {entry!r}")
        mutation = Mutation(**{key: entry[key] for key in FIELDS})
        if mutation.name in names:
            raise TitoError(f"{shown}: two mutations are named {mutation.name!r}")
        if mutation.part not in parts:
            raise TitoError(f"{shown}, {mutation.name!r}: part {mutation.part!r} is not an auto-graded part of "
                            f"{module.relative(module.source)}; its parts are {', '.join(sorted(parts))}")
        if mutation.find == mutation.replace:
            raise TitoError(f"{shown}, {mutation.name!r}: replace is the same text as find")
        names.add(mutation.name)
        mutations.append(mutation)
    return mutations


def solution_regions(text: str) -> list[tuple[int, int]]:
    """(start, end) character offsets of the text between each BEGIN SOLUTION line and its END SOLUTION line."""
    regions, start, offset = [], None, 0
    for line in text.splitlines(keepends=True):
        if BEGIN_SOLUTION in line:
            start = offset + len(line)
        elif END_SOLUTION in line and start is not None:
            regions.append((start, offset))
            start = None
        offset += len(line)
    return regions


def apply_mutation(mutation: Mutation, text: str, shown: str) -> str:
    """`text` with the mutation's find replaced; raises unless find occurs once, inside a solution region."""
    count = text.count(mutation.find)
    if count != 1:
        problem = "does not occur" if count == 0 else f"occurs {count} times (make it longer to name one place)"
        raise TitoError(f"mutation {mutation.name!r}: its find text {problem} in {shown}:\n{mutation.find}")
    start = text.index(mutation.find)
    end = start + len(mutation.find)
    if not any(begin <= start and end <= finish for begin, finish in solution_regions(text)):
        raise TitoError(f"mutation {mutation.name!r}: its find text lies outside every solution region of {shown} "
                        f"(between {BEGIN_SOLUTION} and {END_SOLUTION}):\n{mutation.find}")
    return text[:start] + mutation.replace + text[end:]


def _copy_workspace(root: Path, module: Module, destination: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints", "*.bak*")
    for name in COPIED:
        source = root / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=ignore)
        elif source.is_file():
            shutil.copy2(source, destination / name)
    shutil.copytree(module.tests, destination / module.relative(module.tests), ignore=ignore)
    return destination


@dataclass
class MutationResult:
    name: str
    part: str
    kept: float           # points the part still earns with the bug
    possible: float
    tests: int
    tests_passed: int
    problems: list

    @property
    def kept_share(self) -> float:
        return self.kept / self.possible if self.possible else 1.0

    @property
    def broken(self) -> bool:
        """The mutated package does not import: the table's replacement, not a bug the tests should find."""
        return any("does not import" in problem for problem in self.problems)

    @property
    def caught(self) -> bool:
        return not self.broken and self.kept_share < KEEP_LIMIT

    def as_dict(self) -> dict:
        return dict(asdict(self), percent_kept=round(100 * self.kept_share, 1), caught=self.caught,
                    broken=self.broken)


def _check_baseline(root: Path, spec: str, parts: list[str], timeout: float) -> None:
    """The unmutated module earns every point of the parts the mutations will cost."""
    result = grade(root, spec, timeout=timeout, part=parts[0] if len(parts) == 1 else None)
    short = {part["grade_id"]: part for part in result["parts"] if part["grade_id"] in parts
             and (not part["tests"] or part["passed"] < len(part["tests"]))}
    if short or result["problems"]:
        names = ", ".join(f"{grade_id} ({len(part['tests']) - part['passed']} of {len(part['tests'])} tests failing)"
                          for grade_id, part in short.items())
        raise TitoError("the unmutated source does not earn every point, so mutations would prove nothing: "
                        + (names or "; ".join(result["problems"])[:2000]))


def mutate(root: Path, spec: str, only: str | None = None, timeout: float = 300, on_start=None,
           on_result=None) -> dict:
    """Apply each mutation of the module named by `spec` (those whose name contains `only`) in a scratch
    copy of the workspace, and grade its part. `on_start(source, count)` is called once the table is
    checked, and `on_result(result)` after each mutation."""
    module = resolve_module(root, spec)
    shown = module.relative(module.source)
    mutations = load_mutations(module)
    if only is not None:
        mutations = [mutation for mutation in mutations if only.lower() in mutation.name.lower()]
        if not mutations:
            raise TitoError(f"no mutation in {module.relative(mutations_path(module))} has {only!r} in its name",
                            exit_code=2)
    original = module.source.read_text(encoding="utf-8")
    mutated = [apply_mutation(mutation, original, shown) for mutation in mutations]   # all checked before any run
    if not module.tests.is_dir():
        raise TitoError(f"no grading tests for {module.folder_name}: expected them in {module.relative(module.tests)}")
    if on_start is not None:
        on_start(shown, len(mutations))
    results = []
    with tempfile.TemporaryDirectory(prefix="tito-mutate-") as scratch:
        copy = _copy_workspace(root, module, Path(scratch))
        copied = resolve_module(copy, module.number)
        try:
            export(copy, [copied])
        except TitoError as error:
            raise TitoError(f"the workspace does not export as it is, so no mutation was tried:\n{error}") from error
        _check_baseline(copy, module.number, sorted({mutation.part for mutation in mutations}), timeout)
        points = {part.grade_id: part.points for part in graded_parts(copied)}
        for mutation, text in zip(mutations, mutated):
            write_atomic(copied.source, text)
            try:
                export(copy, [copied])
            except TitoError as error:                 # e.g. a replace that nbdev cannot export
                problem = f"the mutated source does not export, so the package does not import: {error}"
                result = MutationResult(mutation.name, mutation.part, 0.0, points[mutation.part], 0, 0, [problem])
            else:
                graded = grade(copy, module.number, timeout=timeout, part=mutation.part)
                part = next(part for part in graded["parts"] if part["grade_id"] == mutation.part)
                result = MutationResult(mutation.name, mutation.part, part["earned"], part["points"],
                                        len(part["tests"]), part["passed"], graded["problems"])
            results.append(result)
            if on_result is not None:
                on_result(result)
    return {
        "module": module.folder_name,
        "source": shown,
        "mutations_file": module.relative(mutations_path(module)),
        "keep_limit": KEEP_LIMIT,
        "mutations": [result.as_dict() for result in results],
        "caught": sum(result.caught for result in results),
        "all_caught": all(result.caught for result in results),
    }


def format_header(source: str, count: int) -> str:
    return "\n".join([f"tito mutate: {count} mutation(s) of {source}, each graded by its part's tests only; "
                      f"a mutation is caught when it keeps less than {KEEP_LIMIT:.0%} of the part's points", "",
                      f"{'part':<26} {'kept':>6} {'of':>4} {'kept %':>7}  {'result':<8} mutation"])


def format_result(result: MutationResult) -> str:
    verdict = "BROKEN" if result.broken else "caught" if result.caught else "MISSED"
    return (f"{result.part:<26} {result.kept:>6.2f} {result.possible:>4g} {100 * result.kept_share:>6.1f}%  "
            f"{verdict:<8} {result.name}")


def format_footer(summary: dict) -> str:
    lines = ["", f"{summary['caught']} of {len(summary['mutations'])} mutations caught"]
    missed = [m for m in summary["mutations"] if not m["caught"] and not m["broken"]]
    broken = [m for m in summary["mutations"] if m["broken"]]
    if missed:
        lines.append(f"missed (kept {KEEP_LIMIT:.0%} or more): strengthen the tests of "
                     + ", ".join(sorted({m["part"] for m in missed})))
    for mutation in broken:
        lines.append(f"broken: {mutation['name']!r} makes the package fail to import; fix its replace text")
    return "\n".join(lines)
