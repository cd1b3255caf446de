"""The Python source of a pinned package's source distribution, read without installing or importing it.

tests/test_gpu_contracts.py checks every call the project makes into the GPU packages (the official
`vllm`, `deepspeed`) against their source: the CPU machines that run the suite never install them.

`fetch_sdist` downloads a package's .tar.gz once per machine into the user cache, named by its
sha256, and checks that hash against the one PyPI lists. `SourceTree` holds the package's .py files
(read straight from the archive) and answers, from their syntax trees alone: where a name is
defined (following imports and re-exports), which parameters a function takes, which fields a
dataclass or config model has, which values a `Literal` annotation allows, and which attributes a
class sets.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import tarfile
import tomllib
import urllib.request
from pathlib import Path

from efficient_rl.data.cache import cache_root

ROOT = Path(__file__).resolve().parent.parent
# PEP 691: the index's JSON listing of a project's files, with each file's sha256.
INDEX_URL = "https://pypi.org/simple/{name}/"
INDEX_JSON = "application/vnd.pypi.simple.v1+json"


def pinned_version(extra: str, name: str) -> str:
    """The version pyproject.toml's `extra` pins `name` to (the one place each version is written)."""
    requirements = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][extra]
    versions = [req.split("==", 1)[1].strip() for req in requirements if req.split("==", 1)[0].strip() == name]
    if len(versions) != 1:
        raise LookupError(f"pyproject.toml: the `{extra}` extra pins no single {name}==<version>")
    return versions[0]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def sdist_listing(name: str, version: str) -> tuple[str, str]:
    """(url, sha256) of name==version's source distribution, as the package index lists it."""
    request = urllib.request.Request(INDEX_URL.format(name=name), headers={"Accept": INDEX_JSON})
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    wanted = f"{name.replace('-', '_')}-{version}.tar.gz", f"{name}-{version}.tar.gz"
    found = [entry for entry in files if entry["filename"] in wanted]
    if not found:
        raise LookupError(f"{INDEX_URL.format(name=name)}: no source distribution of {name}=={version}")
    return found[0]["url"], found[0]["hashes"]["sha256"]


def verified(path: Path, sha256: str) -> Path:
    """`path`, if its content hashes to `sha256`; otherwise it is removed and the mismatch raised."""
    actual = file_sha256(path)
    if actual != sha256:
        path.unlink()
        raise ValueError(f"{path.name}: sha256 {actual} is not the {sha256} the package index lists")
    return path


def fetch_sdist(name: str, version: str, directory: Path | None = None) -> Path:
    """name==version's .tar.gz in the cache (`<cache>/sdists/<name>-<version>-<sha256>.tar.gz`),
    downloaded and checked against the index's sha256 on first use; a cached copy is re-hashed."""
    directory = directory or cache_root() / "sdists"
    cached = sorted(directory.glob(f"{name}-{version}-*.tar.gz"))
    if cached:
        return verified(cached[0], cached[0].name.removesuffix(".tar.gz").rsplit("-", 1)[1])
    url, sha256 = sdist_listing(name, version)
    directory.mkdir(parents=True, exist_ok=True)
    staging = directory / f".download-{os.getpid()}-{name}-{version}.tar.gz"
    urllib.request.urlretrieve(url, staging)
    target = directory / f"{name}-{version}-{sha256}.tar.gz"
    os.replace(verified(staging, sha256), target)
    return target


@dataclasses.dataclass(frozen=True)
class Definition:
    """Where a dotted name leads: a module, or a class / function / assigned value in a module."""

    kind: str  # module | class | function | value
    module: str
    node: ast.AST | None = None

    @property
    def name(self) -> str:
        return getattr(self.node, "name", self.module)


@dataclasses.dataclass(frozen=True)
class Parameter:
    name: str
    annotation: ast.expr | None
    module: str  # where the annotation's names are looked up


def top_level(statements: list[ast.stmt]):
    """A module's or class's statements, including those under `if` / `try` (TYPE_CHECKING
    imports, version switches): the names they bind are the body's names too."""
    for statement in statements:
        yield statement
        if isinstance(statement, ast.If):
            yield from top_level(statement.body + statement.orelse)
        elif isinstance(statement, ast.Try):
            yield from top_level(statement.body + statement.orelse + statement.finalbody)
            for handler in statement.handlers:
                yield from top_level(handler.body)


def assigned_names(statement: ast.stmt) -> list[str]:
    if isinstance(statement, ast.Assign):
        return [target.id for target in statement.targets if isinstance(target, ast.Name)]
    if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
        return [statement.target.id]
    return []


def is_staticmethod(function: ast.FunctionDef) -> bool:
    return any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in function.decorator_list)


class SourceTree:
    """A package's modules as syntax trees, by dotted name (`vllm.entrypoints.llm`)."""

    def __init__(self, sources: dict[str, str], label: str):
        self.sources, self.label = sources, label
        self._parsed: dict[str, ast.Module] = {}

    @classmethod
    def from_sdist(cls, archive: Path, package: str) -> SourceTree:
        """The .py files under `<top>/<package>/` of a source distribution, read from the archive."""
        sources = {}
        with tarfile.open(archive) as tar:
            for member in tar:
                parts = member.name.split("/")
                if member.isfile() and len(parts) > 2 and parts[1] == package and member.name.endswith(".py"):
                    dotted = ".".join(parts[1:]).removesuffix(".py").removesuffix(".__init__")
                    sources[dotted] = tar.extractfile(member).read().decode("utf-8")
        name, version, _ = archive.name.split("-", 2)  # fetch_sdist's <name>-<version>-<sha256>.tar.gz
        return cls(sources, f"{name} {version} sdist")

    def replaced(self, module: str, old: str, new: str) -> SourceTree:
        """A copy with one text replacement in one module: a future release, to see a check fail."""
        if old not in self.sources[module]:
            raise ValueError(f"{module}: has no {old!r}")
        edited = SourceTree({**self.sources, module: self.sources[module].replace(old, new)}, self.label + " (edited)")
        edited._parsed = {name: tree for name, tree in self._parsed.items() if name != module}
        return edited

    def is_module(self, dotted: str) -> bool:
        return dotted in self.sources

    def module(self, dotted: str) -> ast.Module:
        if dotted not in self._parsed:
            self._parsed[dotted] = ast.parse(self.sources[dotted])
        return self._parsed[dotted]

    def absolute(self, module: str, node: ast.ImportFrom) -> str:
        """The module an import in `module` reads from, relative levels resolved."""
        if not node.level:
            return node.module or ""
        package = module if self.is_package(module) else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        return f"{package}.{node.module}" if node.module else package

    def is_package(self, module: str) -> bool:
        return any(other.startswith(module + ".") for other in self.sources)

    def lookup(self, module: str, name: str, seen: frozenset = frozenset()) -> Definition | None:
        """What `name` is in `module`: defined there, imported into it, or a submodule of it."""
        if (module, name) in seen or not self.is_module(module):
            return None
        seen = seen | {(module, name)}
        for statement in top_level(self.module(module).body):
            if isinstance(statement, ast.ClassDef) and statement.name == name:
                return Definition("class", module, statement)
            if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)) and statement.name == name:
                return Definition("function", module, statement)
            if name in assigned_names(statement):
                return Definition("value", module, statement)
            if isinstance(statement, ast.ImportFrom):
                for alias in statement.names:
                    if (alias.asname or alias.name) == name:
                        source = self.absolute(module, statement)
                        if self.is_module(f"{source}.{alias.name}"):
                            return Definition("module", f"{source}.{alias.name}")
                        found = self.lookup(source, alias.name, seen)
                        if found:
                            return found
            if isinstance(statement, ast.Import):
                for alias in statement.names:
                    if alias.asname == name and self.is_module(alias.name):
                        return Definition("module", alias.name)
        if self.is_module(f"{module}.{name}"):
            return Definition("module", f"{module}.{name}")
        return None

    def resolve(self, dotted: str) -> Definition | None:
        """`vllm.LLM`, `deepspeed.zero.GatheredParameters`, `vllm.distributed.utils.StatelessProcessGroup.create`."""
        parts = dotted.split(".")
        found = Definition("module", parts[0]) if self.is_module(parts[0]) else None
        for part in parts[1:]:
            if found is None:
                return None
            if found.kind == "module":
                found = self.lookup(found.module, part)
            elif found.kind == "class":
                found = self.member(found, part)
            else:
                return None
        return found

    def bases(self, cls: Definition) -> list[Definition]:
        """The base classes defined in this package (torch's, pydantic's and so on are outside it)."""
        found = []
        for base in cls.node.bases:
            if isinstance(base, ast.Subscript):  # Generic[T]
                base = base.value
            dotted = ast.unparse(base)
            head, _, rest = dotted.partition(".")
            definition = self.lookup(cls.module, head)
            for part in rest.split(".") if rest else []:
                definition = (
                    self.lookup(definition.module, part) if definition and definition.kind == "module" else None
                )
            if definition and definition.kind == "class":
                found.append(definition)
        return found

    def lineage(self, cls: Definition) -> list[Definition]:
        """The class and its in-package bases, nearest first."""
        order, pending = [], [cls]
        while pending:
            current = pending.pop(0)
            if all(current.node is not seen.node for seen in order):
                order.append(current)
                pending.extend(self.bases(current))
        return order

    def member(self, cls: Definition, name: str) -> Definition | None:
        """A method, property or class attribute `name` of the class or an in-package base."""
        for owner in self.lineage(cls):
            for statement in top_level(owner.node.body):
                if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)) and statement.name == name:
                    return Definition("function", owner.module, statement)
                if name in assigned_names(statement):
                    return Definition("value", owner.module, statement)
        return None

    def fields(self, cls: Definition) -> dict[str, Parameter]:
        """Annotated class-level names (dataclass, msgspec.Struct and pydantic fields), bases first;
        a pydantic `Field(alias=...)` is accepted under its alias too."""
        found = {}
        for owner in reversed(self.lineage(cls)):
            for statement in owner.node.body:
                if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
                    if "ClassVar" in ast.unparse(statement.annotation):
                        continue
                    field = Parameter(statement.target.id, statement.annotation, owner.module)
                    found[field.name] = field
                    for alias in field_keywords(statement).get("alias", []):
                        found[alias] = field
        return found

    def sets_attribute(self, cls: Definition, name: str) -> bool:
        """The class (or a base) defines `name`, or one of its methods assigns `self.<name>`."""
        if self.member(cls, name):
            return True
        for owner in self.lineage(cls):
            for node in ast.walk(owner.node):
                targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
                for target in targets:
                    if (
                        isinstance(target, ast.Attribute)
                        and target.attr == name
                        and ast.unparse(target.value) == "self"
                    ):
                        return True
                    if isinstance(target, ast.Subscript) and ast.unparse(target) == f"self.__dict__[{name!r}]":
                        return True
        return False

    def literal_values(self, module: str, annotation: ast.expr | None, seen: frozenset = frozenset()) -> set | None:
        """The values the `Literal[...]` and Enum parts of an annotation allow (through type
        aliases); None when the annotation has neither."""
        if annotation is None:
            return None
        if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):  # "quoted" annotation
            annotation = ast.parse(annotation.value, mode="eval").body
        found = None
        for node in ast.walk(annotation):
            values = None
            if isinstance(node, ast.Subscript) and ast.unparse(node.value).endswith("Literal"):
                elements = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
                values = {element.value for element in elements if isinstance(element, ast.Constant)}
            elif isinstance(node, ast.Name) and (module, node.id) not in seen:
                alias = self.lookup(module, node.id)
                if alias and alias.kind == "value" and alias.node.value is not None:
                    values = self.literal_values(alias.module, alias.node.value, seen | {(module, node.id)})
                elif alias and alias.kind == "class" and any(ast.unparse(b).endswith("Enum") for b in alias.node.bases):
                    values = enum_values(alias.node)
            if values is not None:
                found = (found or set()) | values
        return found


def enum_values(cls: ast.ClassDef) -> set:
    """An Enum's member values (pydantic config models with use_enum_values take these)."""
    return {
        statement.value.value
        for statement in cls.body
        if isinstance(statement, ast.Assign) and isinstance(statement.value, ast.Constant)
    }


def field_keywords(statement: ast.AnnAssign) -> dict[str, list]:
    """The constant keyword arguments of a `Field(...)` default, as lists (alias, json_schema_extra...)."""
    call = statement.value
    if not (isinstance(call, ast.Call) and ast.unparse(call.func).endswith("Field")):
        return {}
    found = {}
    for keyword in call.keywords:
        if isinstance(keyword.value, ast.Constant):
            found[keyword.arg] = [keyword.value.value]
        elif isinstance(keyword.value, ast.Dict):
            found[keyword.arg] = [
                {ast.literal_eval(k): ast.unparse(v) for k, v in zip(keyword.value.keys, keyword.value.values) if k}
            ]
    return found


def parameters(definition: Definition, bound: bool) -> tuple[list[Parameter], list[Parameter], ast.arguments]:
    """(positional-or-keyword, keyword-only) parameters of a function; `bound` drops self / cls."""
    arguments = definition.node.args
    positional = [Parameter(a.arg, a.annotation, definition.module) for a in arguments.posonlyargs + arguments.args]
    if bound and not is_staticmethod(definition.node):
        positional = positional[1:]
    keyword_only = [Parameter(a.arg, a.annotation, definition.module) for a in arguments.kwonlyargs]
    return positional, keyword_only, arguments


UNKNOWN = object()  # an argument's value the project computes at run time


@dataclasses.dataclass
class Call:
    """One call the project makes into a package: where, into what, with which arguments."""

    site: str  # efficient_rl/rollout/vllm_engine.py:142
    target: str  # the dotted name in the package: vllm.LLM, vllm.LLM.generate
    positional: int  # how many positional arguments (-1: unknown, a *args)
    keywords: dict[str, object]  # name -> its constant value, or UNKNOWN

    def describe(self, name: str) -> str:
        return f"{self.site}: {self.target}({name}=...)"


def accepts(tree: SourceTree, function: Definition, call: Call, bound: bool) -> tuple[list[str], list[str]]:
    """(problems, keywords left to a **kwargs) of `call` against `function`'s parameters."""
    positional, keyword_only, arguments = parameters(function, bound)
    problems, forwarded = [], []
    positional_only = {a.arg for a in arguments.posonlyargs}
    named = {p.name: p for p in positional if p.name not in positional_only}
    named.update({p.name: p for p in keyword_only})
    if call.positional > len(positional) and arguments.vararg is None:
        problems.append(
            f"{call.site}: {call.target} takes {len(positional)} positional arguments, not {call.positional}"
        )
    for name, value in call.keywords.items():
        if name in named:
            problems += value_problems(tree, named[name], value, call)
        elif arguments.kwarg is not None:
            forwarded.append(name)
        else:
            problems.append(f"{call.describe(name)}: {tree.label} has no parameter {name!r}")
    without_default = positional[: len(positional) - len(arguments.defaults)] if arguments.defaults else positional
    required = [p.name for p in without_default[max(call.positional, 0) :]] if call.positional >= 0 else []
    required += [p.name for p, default in zip(keyword_only, arguments.kw_defaults) if default is None]
    problems += [
        f"{call.site}: {call.target} requires {name!r}, which the project does not pass"
        for name in required
        if name not in call.keywords
    ]
    return problems, forwarded


def value_problems(tree: SourceTree, parameter: Parameter, value, call: Call) -> list[str]:
    """A constant the project passes must be one of the values a Literal annotation allows."""
    allowed = tree.literal_values(parameter.module, parameter.annotation)
    if value is UNKNOWN or allowed is None or value in allowed:
        return []
    return [f"{call.describe(parameter.name)}: {value!r} is not one of {sorted(map(str, allowed))}"]


def field_problems(tree: SourceTree, cls: Definition, call: Call, names: list[str]) -> list[str]:
    fields = tree.fields(cls)
    problems = []
    for name in names:
        if name in fields:
            problems += value_problems(tree, fields[name], call.keywords[name], call)
        else:
            problems.append(f"{call.describe(name)}: {cls.module}.{cls.name} has no field {name!r}")
    return problems


def call_problems(tree: SourceTree, call: Call, forwards_to: str | None = None) -> list[str]:
    """What in `call` the package's source does not accept: a missing symbol, an unknown keyword,
    too many positional arguments, a required argument not given, a value outside a Literal.
    A class is called through its `__init__`, or by its fields when it has none in the package
    (dataclass, msgspec.Struct). `forwards_to`: the class whose fields receive the keywords
    a `**kwargs` collects (vLLM's LLM hands them to EngineArgs)."""
    definition = tree.resolve(call.target)
    if definition is None:
        return [f"{call.site}: {call.target} is not in {tree.label}"]
    if definition.kind == "class":
        init = tree.member(definition, "__init__")
        if init is None:
            return field_problems(tree, definition, call, list(call.keywords))
        problems, forwarded = accepts(tree, init, call, bound=True)
    elif definition.kind == "function":
        method = "." in call.target and tree.resolve(call.target.rpartition(".")[0])
        problems, forwarded = accepts(tree, definition, call, bound=bool(method) and method.kind == "class")
    else:
        return [f"{call.site}: {call.target} is a {definition.kind} in {tree.label}, not something to call"]
    if forwarded and forwards_to:
        problems += field_problems(tree, tree.resolve(forwards_to), call, forwarded)
    return problems


def strings_read(tree: SourceTree, under: str) -> set[str]:
    """The strings a package's modules under `under` look keys up by: each string constant used as
    a call argument (`param_dict.get("bf16")`), a subscript or in a comparison, and the value of each
    module-level `NAME = "key"` constant whose NAME is used anywhere there. A renamed config key
    leaves the old string in none of these places."""
    constants, used, direct = {}, set(), set()
    for name in (m for m in tree.sources if m == under or m.startswith(under + ".")):
        module = tree.module(name)
        for statement in module.body:
            if isinstance(statement, ast.Assign) and isinstance(statement.value, ast.Constant):
                for target in assigned_names(statement):
                    constants.setdefault(target, set()).add(statement.value.value)
        for node in ast.walk(module):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
                used.add(node.id)
            elif isinstance(node, ast.Attribute):
                used.add(node.attr)
            if isinstance(node, ast.Call):
                direct |= {arg.value for arg in node.args if isinstance(arg, ast.Constant)}
            elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
                direct.add(node.slice.value)
            elif isinstance(node, ast.Compare):
                direct |= {side.value for side in [node.left, *node.comparators] if isinstance(side, ast.Constant)}
    return {value for name, values in constants.items() if name in used for value in values} | direct


def config_problems(
    tree: SourceTree, section: dict, model: Definition | None, path: str, read: set[str], site: str
) -> list[str]:
    """Keys of a config dict the package does not take. A section with a config `model` (a pydantic
    class) takes its fields and aliases, not deprecated ones, with values its Literal / Enum
    annotations allow, and nested sections by the model their field names; a plain section takes
    the keys the package reads (`read`)."""
    problems = []
    for key, value in section.items():
        where = f"{site}: {path}{key}"
        if model is None:
            if key not in read:
                problems.append(f"{where}: {tree.label} reads no {key!r} key")
                continue
            nested = None
        else:
            fields = tree.fields(model)
            if key not in fields:
                problems.append(f"{where}: {model.module}.{model.name} has no field {key!r}")
                continue
            field = fields[key]
            problems += deprecation_problems(tree, model, field, where)
            problems += value_problems(tree, field, value, Call(f"{site}: {path}", f"{model.name}", 0, {key: value}))
            nested = annotated_class(tree, field)
        if isinstance(value, dict):
            problems += config_problems(tree, value, nested, f"{path}{key}.", read, site)
    return problems


def deprecation_problems(tree: SourceTree, model: Definition, field: Parameter, where: str) -> list[str]:
    for owner in tree.lineage(model):
        for statement in owner.node.body:
            if isinstance(statement, ast.AnnAssign) and ast.unparse(statement.target) == field.name:
                extra = (field_keywords(statement).get("json_schema_extra") or [{}])[0]
                if extra.get("deprecated") == "True":
                    return [f"{where}: deprecated in {tree.label} (new name: {extra.get('new_param', '?')})"]
    return []


def annotated_class(tree: SourceTree, field: Parameter) -> Definition | None:
    """The in-package class a field's annotation names (`Optional[DeepSpeedZeroOffloadOptimizerConfig]`)."""
    for node in ast.walk(field.annotation):
        if isinstance(node, ast.Name):
            found = tree.lookup(field.module, node.id)
            if found and found.kind == "class":
                return found
    return None
