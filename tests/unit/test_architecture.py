"""The module rules of ``docs/architecture.md``, checked on the source with ``ast``.

Every module under ``envfs/`` is parsed (never imported) and every import in it is
collected, at any level: module top, functions, methods, ``if TYPE_CHECKING:`` blocks, and
``importlib.import_module("...")`` / ``__import__("...")`` with a literal name. A failure
names the module, the line and the offending import or call, and the rule it breaks.

Names in the tables are dotted prefixes: ``envfs.kms`` means the package and everything
under it, ``cryptography`` means ``cryptography`` and every submodule (``hazmat`` too).
"""

from __future__ import annotations

import ast
import functools
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[2] / "envfs"

# --- the rule table ----------------------------------------------------------------------


@dataclass(frozen=True)
class ForbiddenImport:
    """Modules under ``modules`` (minus ``except_for``) never import anything ``forbidden``
    (minus ``unless``)."""

    name: str
    modules: tuple[str, ...]
    except_for: tuple[str, ...]
    forbidden: tuple[str, ...]
    why: str
    unless: tuple[str, ...] = ()


@dataclass(frozen=True)
class OnlyImports:
    """Modules under ``modules`` import only ``allowed`` (and the stdlib if ``stdlib``)."""

    name: str
    modules: tuple[str, ...]
    allowed: tuple[str, ...]
    stdlib: bool
    why: str


KMS = "envfs.kms"
FILES = "envfs.files"
KEYS = "envfs.keys"
CLI = "envfs.cli"
# The vocabulary every package may share: small modules at the top of the tree.
SHARED = ("envfs.errors", "envfs.crypto", "envfs.identity", "envfs.arn")
# Every module lives in a package whose rules cover it, or is one of these.
TOP_LEVEL = (*SHARED, "envfs", "envfs.notify", "envfs.__main__")
PACKAGES = (FILES, KEYS, KMS, CLI)
# The one module of ``keys`` the file side may import.
KEY_PROVIDER = "envfs.keys.provider"
# The library may not know its command line; ``envfs/__main__.py`` is its entry point.
CLI_SIDE = (CLI, "envfs.__main__")

IMPORT_RULES: tuple[ForbiddenImport | OnlyImports, ...] = (
    ForbiddenImport(
        "pyfuse3-in-adapter-only",
        modules=("envfs",),
        except_for=("envfs.files.fuseops", "envfs.files.mount"),
        forbidden=("pyfuse3",),
        why="pyfuse3 is imported only by files/fuseops.py and files/mount.py; the core is"
        " testable unmounted",
    ),
    ForbiddenImport(
        "jmespath-in-cli-output-only",
        modules=("envfs",),
        except_for=("envfs.cli.output",),
        forbidden=("jmespath",),
        why="cli/output.py is the only importer of jmespath: --query is evaluated in one place",
    ),
    ForbiddenImport(
        "aws-sdk-in-awskms-or-cli-only",
        modules=("envfs",),
        except_for=("envfs.keys.awskms", "envfs.cli"),
        forbidden=("botocore", "boto3"),
        why="the AWS SDK stays out of the file side and the key service: keys/awskms.py speaks"
        " to AWS KMS for mounts (the command line may use it too)",
    ),
    ForbiddenImport(
        "cryptography-in-crypto-only",
        modules=("envfs",),
        except_for=("envfs.crypto",),
        forbidden=("cryptography",),
        why="crypto.py is the only importer of cryptography (hazmat or not)",
    ),
    OnlyImports(
        "errors-stdlib-only",
        modules=("envfs.errors", "envfs.identity", "envfs.notify"),
        allowed=(),
        stdlib=True,
        why="errors.py, identity.py and notify.py import only the standard library",
    ),
    OnlyImports(
        "crypto-imports",
        modules=("envfs.crypto",),
        allowed=("envfs.errors", "cryptography"),
        stdlib=True,
        why="crypto.py imports only errors, the standard library and cryptography",
    ),
    OnlyImports(
        "arn-imports",
        modules=("envfs.arn",),
        allowed=("envfs.errors",),
        stdlib=True,
        why="arn.py (ARNs and regions of any partition) imports only errors",
    ),
    OnlyImports(
        "files-reach-keys-through-the-provider-only",
        modules=(FILES,),
        allowed=(FILES, *SHARED, KEY_PROVIDER, "pyfuse3", "trio"),
        stdlib=True,
        why="the file side imports its own package, the shared vocabulary and keys/provider.py,"
        " the one narrow interface to any key service",
    ),
    OnlyImports(
        "key-provider-interface-imports",
        modules=(KEY_PROVIDER,),
        allowed=("envfs.identity",),
        stdlib=True,
        why="keys/provider.py is the file side's door to every key service: it loads none",
    ),
    ForbiddenImport(
        "keys-know-no-files",
        modules=(KEYS,),
        except_for=(),
        forbidden=(FILES, CLI),
        why="key providers know nothing of files, FUSE or the command line",
    ),
    OnlyImports(
        "format-imports",
        modules=("envfs.files.fileformat",),
        allowed=("envfs.crypto", "envfs.errors"),
        stdlib=True,
        why="files/fileformat.py is pure: crypto, errors and the standard library only",
    ),
    OnlyImports(
        "acl-stdlib-only",
        modules=("envfs.files.acl",),
        allowed=(),
        stdlib=True,
        why="files/acl.py (ACL values and ext4's mode rules) is pure: the standard library only",
    ),
    OnlyImports(
        "kms-knows-no-files",
        modules=(KMS,),
        allowed=(KMS, *SHARED, "trio", "h11"),
        stdlib=True,
        why="the key service imports only its own package and the shared vocabulary: it knows"
        " nothing of files, key providers, FUSE or the command line and is usable alone",
    ),
    ForbiddenImport(
        "sync-core-no-trio",
        modules=("envfs.files.fileformat", "envfs.crypto", KMS),
        except_for=(
            "envfs.kms.server",
            "envfs.kms.httpserver",
            "envfs.kms.dispatch",
            "envfs.kms.client",
        ),
        forbidden=("trio", "h11"),
        why="format, crypto and kms (except server/httpserver/dispatch/client) are synchronous",
    ),
    ForbiddenImport(
        "library-knows-no-cli",
        modules=("envfs",),
        except_for=CLI_SIDE,
        forbidden=(CLI,),
        why="the command line sits on top; nothing below it imports it",
    ),
    OnlyImports(
        "kms-model-imports",
        modules=("envfs.kms.model",),
        allowed=("envfs.errors", "envfs.arn"),
        stdlib=True,
        why="kms/model.py is the key service's vocabulary: errors, arn and the stdlib only",
    ),
    OnlyImports(
        "kms-policy-imports",
        modules=("envfs.kms.policy",),
        allowed=("envfs.errors", "envfs.identity", "envfs.kms.model"),
        stdlib=True,
        why="kms/policy.py imports only model, identity and errors",
    ),
    OnlyImports(
        "kms-paths-imports",
        modules=("envfs.kms.paths",),
        allowed=("envfs.errors", "envfs.arn"),
        stdlib=True,
        why="kms/paths.py (where the key service keeps its files) imports only arn and errors",
    ),
    OnlyImports(
        "kms-rootkey-imports",
        modules=("envfs.kms.rootkey",),
        allowed=("envfs.crypto", "envfs.errors", "envfs.kms.paths"),
        stdlib=True,
        why="kms/rootkey.py (where a store's root key comes from) imports only paths, crypto"
        " and errors",
    ),
    OnlyImports(
        "kms-store-imports",
        modules=("envfs.kms.store",),
        allowed=(
            "envfs.crypto",
            "envfs.arn",
            "envfs.errors",
            "envfs.kms.model",
            "envfs.kms.paths",
            "envfs.kms.rootkey",
            "envfs.kms.audit",
            "envfs.kms.archive",
            "envfs.kms.auditbatch",
            "envfs.kms.retention",
        ),
        stdlib=True,
        why="kms/store.py imports only model, paths, rootkey, audit, archive, auditbatch,"
        " retention, arn, crypto and errors",
    ),
    OnlyImports(
        "kms-auditbatch-imports",
        modules=("envfs.kms.auditbatch",),
        allowed=("envfs.errors", "envfs.kms.audit", "envfs.kms.journal"),
        stdlib=True,
        why="kms/auditbatch.py (batched audit records and their journals) imports only audit,"
        " journal and errors",
    ),
    OnlyImports(
        "kms-journal-imports",
        modules=("envfs.kms.journal",),
        allowed=("envfs.crypto",),
        stdlib=True,
        why="kms/journal.py (the store's audit journal files) imports only crypto",
    ),
    OnlyImports(
        "kms-audit-imports",
        modules=("envfs.kms.audit",),
        allowed=("envfs.crypto",),
        stdlib=True,
        why="kms/audit.py (the store's audit chain) imports only crypto",
    ),
    OnlyImports(
        "kms-archive-imports",
        modules=("envfs.kms.archive",),
        allowed=("envfs.crypto", "envfs.errors", "envfs.kms.audit"),
        stdlib=True,
        why="kms/archive.py (audit archive files) imports only audit, crypto and errors",
    ),
    OnlyImports(
        "kms-retention-imports",
        modules=("envfs.kms.retention",),
        allowed=("envfs.errors", "envfs.kms.audit", "envfs.kms.archive"),
        stdlib=True,
        why="kms/retention.py (archiving and repairing the audit log) imports only audit,"
        " archive and errors",
    ),
    OnlyImports(
        "config-imports",
        modules=("envfs.cli.config",),
        allowed=(
            "envfs.errors",
            "envfs.arn",
            "envfs.keys.choice",
            "envfs.keys.awscreds",
            "envfs.files.mountopts",
        ),
        stdlib=True,
        why="cli/config.py reads TOML into a typed config: errors, arn, the key-service choice,"
        " the file trust checks of credential mappings, the mount options and the stdlib only",
    ),
    OnlyImports(
        "declared-dependencies-only",
        modules=("envfs",),
        allowed=(
            "envfs",
            "cryptography",
            "jmespath",
            "pyfuse3",
            "trio",
            "h11",
            "boto3",
            "botocore",
        ),
        stdlib=True,
        why="third-party imports are the dependencies pyproject.toml declares",
    ),
)

# Printing and exiting belong to the command line (and the ``python -m envfs`` shim).
OUTPUT_AND_EXIT_ALLOWED = CLI_SIDE
OUTPUT_AND_EXIT_WHY = "only envfs/cli/* prints, writes to stdout/stderr or exits the process"

# Synchronous modules: no ``async def``, ``await``, ``async for`` or ``async with``.
SYNC_MODULES = ("envfs.files.fileformat", "envfs.crypto", KMS)
SYNC_EXCEPT = ("envfs.kms.server", "envfs.kms.httpserver", "envfs.kms.dispatch")
SYNC_WHY = "format, crypto and kms (except the daemon's transports and dispatch) are synchronous"


# --- scanning ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Module:
    name: str  # dotted, e.g. "envfs.kms.store"
    path: str  # as shown in messages, e.g. "envfs/kms/store.py"
    is_package: bool
    tree: ast.Module


@dataclass(frozen=True)
class Found:
    line: int
    target: str  # the imported module, or the forbidden call
    source: str  # the statement as written


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def load_modules(root: Path = SOURCE) -> dict[str, Module]:
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        shown = str(path.relative_to(root.parent))
        modules[name] = Module(name, shown, is_package, tree)
    return modules


def _resolve_from(
    module: str, is_package: bool, node: ast.ImportFrom, known: set[str]
) -> list[str]:
    """The modules a ``from X import a, b`` statement imports (``X.a`` if it is a module)."""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, *([node.module] if node.module else [])])
    else:
        base = node.module or ""
    targets = []
    for alias in node.names:
        candidate = f"{base}.{alias.name}"
        targets.append(candidate if candidate in known else base)
    return targets


def _dynamic_import(node: ast.Call) -> str | None:
    """``"importlib.import_module"`` or ``"__import__"`` if the call is one, else None."""
    func = node.func
    if isinstance(func, ast.Name) and func.id in ("__import__", "import_module"):
        return func.id
    if (
        isinstance(func, ast.Attribute)
        and func.attr == "import_module"
        and isinstance(func.value, ast.Name)
        and func.value.id == "importlib"
    ):
        return "importlib.import_module"
    return None


def imports_of(module: Module, known: set[str]) -> list[Found]:
    """Every import in ``module``, in line order; a non-literal dynamic import as ``?``."""
    return sorted(_imports(module, known), key=lambda found: found.line)


def _imports(module: Module, known: set[str]) -> Iterator[Found]:
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Found(node.lineno, alias.name, ast.unparse(node))
        elif isinstance(node, ast.ImportFrom):
            if node.module == "__future__":
                continue
            for target in _resolve_from(module.name, module.is_package, node, known):
                yield Found(node.lineno, target, ast.unparse(node))
        elif isinstance(node, ast.Call) and _dynamic_import(node):
            arg = node.args[0] if node.args else None
            target = "?"
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                target = arg.value
            yield Found(node.lineno, target, ast.unparse(node))


def _names_bound_to(tree: ast.Module, module: str, attr: str | None) -> set[str]:
    """Local names for ``module`` (``attr`` None) or for ``module.attr`` in ``tree``."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and attr is None:
            names.update(a.asname or a.name for a in node.names if a.name == module)
        elif isinstance(node, ast.ImportFrom) and node.module == module and attr is not None:
            names.update(a.asname or a.name for a in node.names if a.name == attr)
    return names


def output_and_exit_of(module: Module) -> list[Found]:
    """``print(...)``, exits, and uses of ``sys.stdout``/``sys.stderr``, in line order."""
    return sorted(_output_and_exit(module.tree), key=lambda found: found.line)


def _output_and_exit(tree: ast.Module) -> Iterator[Found]:
    sys_names = _names_bound_to(tree, "sys", None) | {"sys"}
    os_names = _names_bound_to(tree, "os", None) | {"os"}
    exit_names = {"exit", "quit"} | _names_bound_to(tree, "sys", "exit")
    stream_names = _names_bound_to(tree, "sys", "stdout") | _names_bound_to(tree, "sys", "stderr")
    for node in ast.walk(tree):
        what = None
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id == "print":
                what = "print()"
            elif isinstance(func, ast.Name) and func.id in exit_names:
                what = f"{func.id}()"
            elif isinstance(func, ast.Name) and func.id == "SystemExit":
                what = "SystemExit"
            elif (
                isinstance(func, ast.Attribute)
                and isinstance(func.value, ast.Name)
                and (
                    (func.value.id in sys_names and func.attr == "exit")
                    or (func.value.id in os_names and func.attr == "_exit")
                )
            ):
                what = f"{func.value.id}.{func.attr}()"
        elif isinstance(node, ast.Raise) and isinstance(node.exc, ast.Name):
            if node.exc.id == "SystemExit":
                what = "SystemExit"
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in sys_names
            and node.attr in ("stdout", "stderr", "__stdout__", "__stderr__")
        ):
            what = f"{node.value.id}.{node.attr}"
        elif isinstance(node, ast.Name) and node.id in stream_names:
            what = node.id
        if what is not None:
            yield Found(node.lineno, what, ast.unparse(node))


def async_constructs_of(module: Module) -> Iterator[Found]:
    kinds = (ast.AsyncFunctionDef, ast.Await, ast.AsyncFor, ast.AsyncWith)
    for node in ast.walk(module.tree):
        if isinstance(node, kinds):
            line = ast.unparse(node).splitlines()[0]
            yield Found(node.lineno, type(node).__name__, line)


# --- checking ----------------------------------------------------------------------------


def _is_stdlib(name: str) -> bool:
    return name.split(".")[0] in sys.stdlib_module_names


def _covered(rule: ForbiddenImport | OnlyImports, modules: dict[str, Module]) -> list[Module]:
    skip = rule.except_for if isinstance(rule, ForbiddenImport) else ()
    return [
        m for name, m in modules.items() if _within(name, rule.modules) and not _within(name, skip)
    ]


def _where(module: Module, found: Found) -> str:
    return f"{module.path}:{found.line} ({module.name})"


def import_violations(rule: ForbiddenImport | OnlyImports, modules: dict[str, Module]) -> list[str]:
    known = set(modules)
    problems = []
    for module in _covered(rule, modules):
        for found in imports_of(module, known):
            target = found.target
            if target == "?":
                problems.append(
                    f"{_where(module, found)}: dynamic import the rules cannot check:"
                    f" {found.source}"
                )
                continue
            if isinstance(rule, ForbiddenImport):
                bad = _within(target, rule.forbidden) and not _within(target, rule.unless)
            else:
                bad = not (_within(target, rule.allowed) or (rule.stdlib and _is_stdlib(target)))
            if bad:
                problems.append(
                    f"{_where(module, found)}: imports {target!r} ({found.source});"
                    f" rule {rule.name!r}: {rule.why}"
                )
    return problems


@functools.cache
def _modules() -> dict[str, Module]:
    modules = load_modules()
    assert len(modules) > 20, f"expected envfs's modules under {SOURCE}, found {sorted(modules)}"
    return modules


def _report(problems: list[str]) -> None:
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


# --- the tests ---------------------------------------------------------------------------


def test_every_module_lives_in_a_package_with_rules() -> None:
    homeless = [
        m.path
        for name, m in _modules().items()
        if not _within(name, PACKAGES) and name not in TOP_LEVEL
    ]
    assert homeless == [], (
        "a new module belongs in files/, keys/, kms/ or cli/, whose import rules cover it;"
        " the top of the tree holds only the shared vocabulary"
    )


@pytest.mark.parametrize("rule", IMPORT_RULES, ids=lambda rule: rule.name)
def test_import_rule(rule: ForbiddenImport | OnlyImports) -> None:
    _report(import_violations(rule, _modules()))


def test_only_the_cli_prints_or_exits() -> None:
    problems = [
        f"{_where(module, found)}: {found.target} ({found.source}); {OUTPUT_AND_EXIT_WHY}"
        for name, module in _modules().items()
        if not _within(name, OUTPUT_AND_EXIT_ALLOWED)
        for found in output_and_exit_of(module)
    ]
    _report(problems)


def test_sync_modules_have_no_async_code() -> None:
    problems = [
        f"{_where(module, found)}: {found.target} ({found.source}); {SYNC_WHY}"
        for name, module in _modules().items()
        if _within(name, SYNC_MODULES) and not _within(name, SYNC_EXCEPT)
        for found in async_constructs_of(module)
    ]
    _report(problems)


@pytest.mark.parametrize("rule", IMPORT_RULES, ids=lambda rule: rule.name)
def test_rule_names_existing_modules(rule: ForbiddenImport | OnlyImports) -> None:
    """A renamed module must not leave a rule checking nothing."""
    modules = _modules()
    assert _covered(rule, modules), f"rule {rule.name!r} covers no module"
    named = list(rule.modules)
    if isinstance(rule, ForbiddenImport):
        named += [*rule.except_for, *rule.unless]
        named += [f for f in rule.forbidden if f.startswith("envfs.")]
    else:
        named += [a for a in rule.allowed if a.startswith("envfs.")]
    missing = [n for n in named if n not in modules]
    assert not missing, f"rule {rule.name!r} names modules that do not exist: {missing}"


# --- the scanner itself can fail --------------------------------------------------------


def _fake(name: str, source: str, is_package: bool = False) -> Module:
    return Module(name, "envfs/fake.py", is_package, ast.parse(source))


KNOWN = {"envfs", "envfs.crypto", "envfs.errors", "envfs.kms", "envfs.kms.model"}


def test_scanner_finds_imports_at_every_level() -> None:
    source = """
import os
from envfs import crypto, errors
from envfs.kms.model import Caller
from cryptography.hazmat.primitives import hashes
if TYPE_CHECKING:
    import trio
def f():
    import pyfuse3
    class C:
        def g(self):
            from envfs.kms import model
importlib.import_module("sqlite3")
__import__(name)
"""
    targets = [f.target for f in imports_of(_fake("envfs.kms.x", source), KNOWN)]
    assert targets == [
        "os",
        "envfs.crypto",
        "envfs.errors",
        "envfs.kms.model",
        "cryptography.hazmat.primitives",
        "trio",
        "pyfuse3",
        "envfs.kms.model",
        "sqlite3",
        "?",
    ]


def test_scanner_resolves_relative_imports() -> None:
    source = "from . import model\nfrom .. import crypto\nfrom ..errors import EnvfsError\n"
    assert [f.target for f in imports_of(_fake("envfs.kms.core", source), KNOWN)] == [
        "envfs.kms.model",
        "envfs.crypto",
        "envfs.errors",
    ]
    package = _fake("envfs.kms", "from . import model\n", is_package=True)
    assert [f.target for f in imports_of(package, KNOWN)] == ["envfs.kms.model"]


def test_scanner_finds_output_and_exits() -> None:
    source = """
import sys as system
from sys import exit as leave, stderr
def f():
    print("x")
    system.exit(1)
    leave(2)
    exit()
    os._exit(3)
    raise SystemExit(4)
    raise SystemExit
    system.stdout.write("y")
    stderr.write("z")
    log.info("fine")
"""
    found = [f.target for f in output_and_exit_of(_fake("envfs.x", source))]
    assert found == [
        "print()",
        "system.exit()",
        "leave()",
        "exit()",
        "os._exit()",
        "SystemExit",
        "SystemExit",
        "system.stdout",
        "stderr",
    ]


def test_violation_message_names_module_and_import() -> None:
    modules = {
        "envfs.kms.store": _fake("envfs.kms.store", "def f():\n    import trio\n"),
    }
    rule = next(r for r in IMPORT_RULES if r.name == "sync-core-no-trio")
    assert import_violations(rule, modules) == [
        "envfs/fake.py:2 (envfs.kms.store): imports 'trio' (import trio);"
        " rule 'sync-core-no-trio': format, crypto and kms"
        " (except server/httpserver/dispatch/client) are synchronous"
    ]
    only = OnlyImports("only", ("envfs.kms.store",), ("envfs.errors",), True, "why")
    assert import_violations(only, modules) == [
        "envfs/fake.py:2 (envfs.kms.store): imports 'trio' (import trio); rule 'only': why"
    ]


# --- docs/architecture.md's module table, kept true -----------------------------------------

ARCHITECTURE_DOC = SOURCE.parent / "docs" / "architecture.md"
# Modules of a line or two that need no row: the package markers and ``python -m envfs``.
UNDOCUMENTED = (
    "envfs/__init__.py",
    "envfs/__main__.py",
    "envfs/files/__init__.py",
    "envfs/keys/__init__.py",
    "envfs/kms/__init__.py",
)


def documented_imports() -> dict[str, set[str]]:
    """The module table of docs/architecture.md: ``cli/volume.py`` -> what its imports
    column names (envfs modules as ``kms.model``, third-party packages by name)."""
    text = ARCHITECTURE_DOC.read_text()
    section = text[text.index("\n## Modules") : text.index("\n## Import rules")]
    rows: dict[str, set[str]] = {}
    for row in re.finditer(r"^\| `([a-z0-9_/]+\.py)` \| .*? \| (.*?) \|$", section, re.M):
        cell = row[2].strip()
        rows[row[1]] = set() if cell in ("—", "stdlib") else {n.strip() for n in cell.split(",")}
    return rows


def actual_imports(module: Module, known: set[str]) -> set[str]:
    """What ``module`` imports, named as the table names it (stdlib and itself left out)."""
    names = set()
    for found in imports_of(module, known):
        top = found.target.split(".")[0]
        if found.target.startswith("envfs."):
            names.add(found.target.removeprefix("envfs."))
        elif top != "envfs" and not _is_stdlib(top):
            names.add(top)
    return names - {module.name.removeprefix("envfs.")}


def test_the_architecture_doc_names_every_module_and_no_other() -> None:
    modules = {m.path.removeprefix("envfs/"): m for m in _modules().values()}
    expected = {path for path in modules if f"envfs/{path}" not in UNDOCUMENTED}
    assert set(documented_imports()) == expected


def test_the_architecture_doc_lists_each_modules_imports() -> None:
    modules = {m.path.removeprefix("envfs/"): m for m in _modules().values()}
    known = {m.name for m in modules.values()}
    wrong = [
        f"{path}: the table says {sorted(listed)}, the code imports"
        f" {sorted(actual_imports(modules[path], known))}"
        for path, listed in sorted(documented_imports().items())
        if path in modules and listed != actual_imports(modules[path], known)
    ]
    assert wrong == []


def test_the_file_side_loads_no_key_service() -> None:
    """Importing the whole file side, the mount included, loads ``keys/provider.py`` and
    nothing else of a key service (checked in a fresh interpreter)."""
    import subprocess

    code = (
        "import sys, envfs.files.vfs, envfs.files.mount, envfs.files.fuseops, envfs.files.info\n"
        "print(' '.join(sorted(m for m in sys.modules"
        " if m.startswith(('envfs.kms', 'envfs.keys', 'envfs.cli', 'sqlite3')))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["envfs.keys", "envfs.keys.provider"]
