"""Find the TinyTorch workspace and the course modules inside it."""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

MODULE_DIR_PATTERN = re.compile(r"^(\d{2})_([a-z][a-z0-9_]*)$")
SOURCE_SUFFIX = "_dev.py"


class TitoError(Exception):
    """A user-facing failure: tito prints the message and exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Source:
    """One `*_dev.py` of a module folder, and the notebook and package file made from it.

    `attention_dev.py` becomes `attention_dev.ipynb` and `tinytorch/core/attention.py`.
    """

    root: Path    # the workspace root
    path: Path    # modules/13_attention/attention_dev.py

    @property
    def name(self) -> str:
        return self.path.name[: -len(SOURCE_SUFFIX)]

    @property
    def notebook(self) -> Path:
        return self.path.with_suffix(".ipynb")

    @property
    def package_file(self) -> Path:
        return self.root / "tinytorch" / "core" / f"{self.name}.py"

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()


@dataclass(frozen=True)
class Module:
    """One course module: `modules/13_attention/attention_dev.py` and what is generated from it."""

    root: Path    # the workspace root
    number: str   # "13"
    name: str     # "attention"

    @property
    def folder_name(self) -> str:
        return f"{self.number}_{self.name}"

    @property
    def folder(self) -> Path:
        return self.root / "modules" / self.folder_name

    @property
    def main(self) -> Source:
        """The module's own source, the one students work in."""
        return Source(self.root, self.folder / f"{self.name}{SOURCE_SUFFIX}")

    @property
    def source(self) -> Path:
        return self.main.path

    @property
    def notebook(self) -> Path:
        return self.main.notebook

    @property
    def package_file(self) -> Path:
        return self.main.package_file

    @property
    def sources(self) -> list[Source]:
        """The main source first, then any provided ones beside it (`_attention_checks_dev.py`),
        each exported to its own package file."""
        provided = sorted(path for path in self.folder.glob(f"*{SOURCE_SUFFIX}") if path != self.source)
        return [self.main, *(Source(self.root, path) for path in provided)]

    @property
    def tests(self) -> Path:
        return self.root / "tests" / self.folder_name

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()


def find_root(start: Path | None = None) -> Path:
    """The nearest folder at or above `start` whose pyproject.toml has a [tool.nbdev] table."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        pyproject = folder / "pyproject.toml"
        if pyproject.is_file():
            try:
                config = tomllib.loads(pyproject.read_text(encoding="utf-8"))
            except tomllib.TOMLDecodeError as error:
                raise TitoError(f"{pyproject} is not valid TOML: {error}") from error
            if "nbdev" in config.get("tool", {}):
                return folder
    raise TitoError(
        f"no TinyTorch workspace at or above {here}: expected a pyproject.toml with a [tool.nbdev] table"
    )


def discover_modules(root: Path) -> list[Module]:
    """Every `modules/NN_name/` folder, in course order."""
    modules_dir = root / "modules"
    if not modules_dir.is_dir():
        return []
    found = []
    for folder in sorted(modules_dir.iterdir()):
        match = MODULE_DIR_PATTERN.match(folder.name)
        if folder.is_dir() and match:
            module = Module(root, match.group(1), match.group(2))
            if module.source.exists() or module.notebook.exists():  # not a folder for a module still to come
                found.append(module)
    return found


def resolve_module(root: Path, spec: str) -> Module:
    """Accept `13`, `13_attention` or `attention`; anything else is a usage error (exit 2)."""
    modules = discover_modules(root)
    wanted = spec.strip().lower()
    for module in modules:
        if wanted in (module.number, module.number.lstrip("0"), module.folder_name, module.name):
            return module
    known = ", ".join(module.folder_name for module in modules) or "none"
    raise TitoError(f"unknown module {spec!r}; known modules: {known}", exit_code=2)


def select_modules(root: Path, spec: str | None) -> list[Module]:
    """One module by name, or all of them when `spec` is None."""
    if spec is None:
        modules = discover_modules(root)
        if not modules:
            raise TitoError(f"no modules found under {root / 'modules'}")
        return modules
    return [resolve_module(root, spec)]


def module_metadata(module: Module) -> dict:
    """The module's entry in the workspace's module.yaml, or {} when that file describes another module."""
    path = module.root / "module.yaml"
    if not path.exists():
        return {}
    import yaml

    try:
        metadata = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise TitoError(f"{path} is not valid YAML: {error}") from error
    return metadata if f"{int(metadata.get('number', -1)):02d}" == module.number else {}


def check_prerequisites(module: Module) -> None:
    """Every prerequisite named in module.yaml must be exported before the module can run."""
    for name in module_metadata(module).get("prerequisites", []):
        prerequisite = resolve_module(module.root, name)
        if not prerequisite.package_file.exists():
            raise TitoError(f"module {module.folder_name} needs {prerequisite.folder_name} exported first: "
                            f"run `tito export {prerequisite.number}`")

