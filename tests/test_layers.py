"""The layers of efficient_rl, held by reading the imports of every module (docs/extending.md#layers).

`efficient_rl/algos/` is pure tensor math: it imports torch, the standard library,
`efficient_rl.registry` and other `algos` modules, and nothing else. `rollout/` and `learner/`
never import each other, nor `cluster/`, nor Ray, so either side runs embedded in one process.
Only `cluster/` imports Ray. The core never imports a reward plugin (`efficient_rl.rewards`, the
files under `efficient_rl/rewards/`): answer extraction that data and evaluation need lives in the core, and
the built-in rewards use it from there. No module imports itself through a circle of others,
counting imports inside functions too.

Every import counts: module level, inside functions, relative, and under `TYPE_CHECKING`, since a
circle or a Ray import that only runs later still ties the layers together. Ray must not be
reached from rollout/, learner/ or algos/ through a helper module either.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Package name -> the directory holding it (the reward plugins are efficient_rl/rewards/, inside it).
PACKAGE_DIRS = {"efficient_rl": ROOT / "efficient_rl"}

ALGOS, ROLLOUT, LEARNER, CLUSTER = (
    "efficient_rl.algos",
    "efficient_rl.rollout",
    "efficient_rl.learner",
    "efficient_rl.cluster",
)
REWARD_PLUGINS = "efficient_rl.rewards"
ALGOS_MAY_IMPORT = ("torch", "efficient_rl.registry", ALGOS)


def inside(module: str, package: str) -> bool:
    """`module` is `package` or one of its submodules."""
    return module == package or module.startswith(package + ".")


def module_name(package: str, directory: Path, path: Path) -> str:
    parts = list(path.relative_to(directory).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def module_files() -> dict[str, Path]:
    """Every module of the library, by its dotted name."""
    files = {}
    for package, directory in PACKAGE_DIRS.items():
        for path in sorted(directory.rglob("*.py")):
            files[module_name(package, directory, path)] = path
    return files


def resolved_base(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a `from ... import` reads from (relative levels resolved)."""
    if not node.level:
        return node.module
    anchor = module.split(".") if is_package else module.split(".")[:-1]
    anchor = anchor[: len(anchor) - (node.level - 1)]
    return ".".join(anchor + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """Modules `module` imports anywhere in its file. `from pkg import name` counts as importing
    pkg.name when that is a module of the library (`from efficient_rl.driver import stopping`)."""
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = resolved_base(node, module, path.name == "__init__.py")
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                targets.add(submodule if submodule in known else base)
    targets.discard("__future__")
    return targets


def import_map() -> dict[str, set[str]]:
    files = module_files()
    return {module: imports_of(module, path, set(files)) for module, path in files.items()}


# The rules, each a check of one import: (importer, imported) -> True when it breaks the rule.
def algos_import_beyond_torch(module: str, target: str) -> bool:
    if not inside(module, ALGOS):
        return False
    standard = target.split(".")[0] in sys.stdlib_module_names
    return not standard and not any(inside(target, allowed) for allowed in ALGOS_MAY_IMPORT)


def rollout_learner_cross(module: str, target: str) -> bool:
    pairs = ((ROLLOUT, LEARNER), (LEARNER, ROLLOUT), (ROLLOUT, CLUSTER), (LEARNER, CLUSTER))
    return any(inside(module, side) and inside(target, other) for side, other in pairs)


def ray_outside_cluster(module: str, target: str) -> bool:
    return inside(target, "ray") and not inside(module, CLUSTER)


def core_imports_a_reward_plugin(module: str, target: str) -> bool:
    return inside(target, REWARD_PLUGINS) and not inside(module, REWARD_PLUGINS)


# The folders from the bottom up: a module imports its own layer or those below it, never above.
# A module listed on its own (lab.presets, lab.tasks) sits lower than the rest of its folder.
LAYERS = (
    ("efficient_rl.errors", "efficient_rl.registry"),  # the error types; the registry of methods
    ("efficient_rl.config", ALGOS, "efficient_rl.run", "efficient_rl.lab.presets", "efficient_rl.lab.tasks"),
    ("efficient_rl.data",),  # data sources, prompts, prompt variables, answers, the cache
    ("efficient_rl.models", "efficient_rl.scoring", REWARD_PLUGINS),
    (ROLLOUT, LEARNER),
    ("efficient_rl.lab", "efficient_rl.eval"),  # the lab builds and evaluation both generate
    (CLUSTER,),
    ("efficient_rl.driver",),  # validate, build, the loop
    ("efficient_rl.slurm", "efficient_rl.study", "efficient_rl.cli", "efficient_rl.api", "efficient_rl.__main__"),
)
# Imports that go up a layer on purpose, each with its reason.
UPWARD_IMPORTS = {
    # A `lab:<preset>` model reference resolves to the lab model, built on first use.
    ("efficient_rl.models.sources", "efficient_rl.lab.build"),
}


def layer_of(module: str) -> int | None:
    """The layer of the most specific prefix `module` falls under (None: not the library's). The
    package itself (its __init__) is the top: what it offers is the library's front door."""
    if module == "efficient_rl":
        return len(LAYERS) - 1
    matches = [
        (len(prefix), index) for index, prefixes in enumerate(LAYERS) for prefix in prefixes if inside(module, prefix)
    ]
    return max(matches)[1] if matches else None


def imports_a_higher_layer(module: str, target: str) -> bool:
    below, above = layer_of(module), layer_of(target)
    return below is not None and above is not None and above > below and (module, target) not in UPWARD_IMPORTS


RULES = {
    "algos imports only torch, the standard library and efficient_rl.registry": algos_import_beyond_torch,
    "rollout/ and learner/ never import each other or cluster/": rollout_learner_cross,
    "only cluster/ imports ray": ray_outside_cluster,
    "the core never imports a reward plugin": core_imports_a_reward_plugin,
    "a module imports only its own layer or those below it": imports_a_higher_layer,
}


def violations(imports: dict[str, set[str]], rule: str) -> list[str]:
    breaks = RULES[rule]
    return [
        f"{module} imports {target}"
        for module, targets in sorted(imports.items())
        for target in sorted(targets)
        if breaks(module, target)
    ]


def reachable(imports: dict[str, set[str]], start: str) -> set[str]:
    """Every module (and outside package) importing `start` runs, directly or through others."""
    seen, frontier = set(), [start]
    while frontier:
        for target in imports.get(frontier.pop(), ()):
            if target not in seen:
                seen.add(target)
                frontier.append(target)
    return seen


def ray_reached_from(imports: dict[str, set[str]], packages: tuple[str, ...]) -> list[str]:
    return sorted(
        module
        for module in imports
        if any(inside(module, p) for p in packages)
        and any(inside(target, "ray") for target in reachable(imports, module))
    )


def shortest_cycle(imports: dict[str, set[str]], start: str) -> list[str] | None:
    """The shortest circle of imports from `start` back to it (breadth first), or None."""
    parents, frontier = {start: None}, [start]
    while frontier:
        following = []
        for module in frontier:
            for target in sorted(imports.get(module, ())):
                if target == start:
                    path = [module]
                    while parents[path[-1]] is not None:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if target in imports and target not in parents:
                    parents[target] = module
                    following.append(target)
        frontier = following
    return None


def import_cycles(imports: dict[str, set[str]]) -> list[list[str]]:
    """One circle per module that lies on one, each reported once (the same set of modules)."""
    cycles, covered = [], set()
    for module in sorted(imports):
        cycle = shortest_cycle(imports, module)
        if cycle and frozenset(cycle) not in covered:
            covered.add(frozenset(cycle))
            cycles.append(cycle)
    return cycles


@pytest.fixture(scope="module")
def imports() -> dict[str, set[str]]:
    return import_map()


def test_every_module_has_a_layer(imports):
    unplaced = [module for module in imports if inside(module, "efficient_rl") and layer_of(module) is None]
    assert unplaced == [], "modules in no layer of LAYERS:\n" + "\n".join(unplaced)


def test_every_module_is_read(imports):
    # A checker that finds no files passes every rule: make sure it reads the real tree.
    for expected in (
        "efficient_rl.algos.losses",
        "efficient_rl.cluster.ray_backend",
        "efficient_rl.driver.loop",
        "efficient_rl.rewards.math",
        "efficient_rl.learner.torch_learner",
    ):
        assert expected in imports
    assert "torch" in imports["efficient_rl.algos.losses"]


@pytest.mark.parametrize("rule", RULES)
def test_layer_rule_holds(imports, rule):
    broken = violations(imports, rule)
    assert broken == [], f"{rule}, but:\n" + "\n".join(broken)


def test_rollout_and_learner_reach_no_ray(imports):
    # Not even through a module outside both (a helper that itself imports Ray).
    reaching = ray_reached_from(imports, (ROLLOUT, LEARNER, ALGOS))
    assert reaching == [], "these import Ray through other modules:\n" + "\n".join(reaching)


def test_no_import_cycles(imports):
    cycles = [" -> ".join(cycle) for cycle in import_cycles(imports)]
    assert cycles == [], "import cycles:\n" + "\n".join(cycles)


SYNTHETIC = {
    "efficient_rl.algos.losses": {"torch", "math", "efficient_rl.registry", "efficient_rl.config"},
    "efficient_rl.rollout.hf": {"efficient_rl.learner.objective"},
    "efficient_rl.learner.objective": {"efficient_rl.cluster.weights", "efficient_rl.helper"},
    "efficient_rl.helper": {"ray"},
    "efficient_rl.cluster.weights": {"ray"},
    "efficient_rl.data.sources": {"efficient_rl.rewards.math"},
    "efficient_rl.rewards.math": {"efficient_rl.data.answers"},
    "efficient_rl.a": {"efficient_rl.b"},
    "efficient_rl.b": {"efficient_rl.c"},
    "efficient_rl.c": {"efficient_rl.a"},
    "efficient_rl.data.answers": set(),
}


def test_the_checker_catches_each_broken_rule():
    rules = list(RULES)
    assert violations(SYNTHETIC, rules[0]) == ["efficient_rl.algos.losses imports efficient_rl.config"]
    assert violations(SYNTHETIC, rules[1]) == [
        "efficient_rl.learner.objective imports efficient_rl.cluster.weights",
        "efficient_rl.rollout.hf imports efficient_rl.learner.objective",
    ]
    assert violations(SYNTHETIC, rules[2]) == ["efficient_rl.helper imports ray"]
    assert violations(SYNTHETIC, rules[3]) == ["efficient_rl.data.sources imports efficient_rl.rewards.math"]
    assert violations(
        {
            **SYNTHETIC,
            "efficient_rl.data.prompts": {"efficient_rl.lab.build"},
            "efficient_rl.models.sources": {"efficient_rl.lab.build", "efficient_rl.driver.loop"},
        },
        rules[4],
    ) == [
        "efficient_rl.data.prompts imports efficient_rl.lab.build",
        "efficient_rl.data.sources imports efficient_rl.rewards.math",
        "efficient_rl.learner.objective imports efficient_rl.cluster.weights",
        "efficient_rl.models.sources imports efficient_rl.driver.loop",
    ]
    assert ray_reached_from(SYNTHETIC, (ROLLOUT, LEARNER)) == [
        "efficient_rl.learner.objective",
        "efficient_rl.rollout.hf",
    ]
    assert import_cycles(SYNTHETIC) == [["efficient_rl.a", "efficient_rl.b", "efficient_rl.c", "efficient_rl.a"]]


def test_the_checker_reads_relative_and_function_level_imports(tmp_path):
    package = tmp_path / "efficient_rl"
    (package / "learner").mkdir(parents=True)
    (package / "learner" / "__init__.py").write_text("")
    (package / "learner" / "teacher.py").write_text(
        "from . import base\nfrom ..cluster import actors\n\ndef later():\n    import ray\n"
    )
    known = {"efficient_rl.learner.base", "efficient_rl.cluster.actors"}
    found = imports_of("efficient_rl.learner.teacher", package / "learner" / "teacher.py", known)
    assert found == {"efficient_rl.learner.base", "efficient_rl.cluster.actors", "ray"}


# ---------------------------------------------------------------- binding
BINDER = "efficient_rl.config.binding"
BINDS_ALLOWED_IN = {"efficient_rl.driver.validate"}  # the validation pass: every choice is bound there, once


def binding_calls(path: Path) -> list[int]:
    """Lines of `path` that call config.binding's `bind` (imported by any name, or as an attribute)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == BINDER
        for alias in node.names
        if alias.name == "bind"
    }
    modules = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
        if alias.name == BINDER
    }
    modules |= {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "efficient_rl.config"
        for alias in node.names
        if alias.name == "binding"
    }
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        called = node.func
        if isinstance(called, ast.Name) and called.id in names:
            lines.append(node.lineno)
        elif (
            isinstance(called, ast.Attribute)
            and called.attr == "bind"
            and ast.unparse(called.value) in modules | {BINDER}
        ):
            lines.append(node.lineno)
    return lines


def test_only_the_validation_pass_binds_a_choice():
    # The trainer, selection, the objective, learners, the pipeline and the trackers take bound
    # entries from the plan (config/plan.py); binding a raw choice anywhere else binds it twice.
    binders = {
        module: lines
        for module, path in module_files().items()
        if (lines := binding_calls(path)) and module not in BINDS_ALLOWED_IN
    }
    assert binders == {}, f"bind() outside driver/validate.py: {binders}"
    assert binding_calls(module_files()["efficient_rl.driver.validate"]), "the checker finds no bind() at all"


def test_the_binding_checker_sees_each_spelling(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        "from efficient_rl.config.binding import bind as b\nimport efficient_rl.config.binding\n"
        "from efficient_rl.config import binding\n\ndef f(x):\n    b(x)\n"
        "    efficient_rl.config.binding.bind(x)\n    binding.bind(x)\n    x.bind()\n"
    )
    assert binding_calls(source) == [6, 7, 8]
