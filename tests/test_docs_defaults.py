"""The defaults the docs' tables state are the code's: every table with a `default` column whose
rows name settings (`learner.micro_batch_size`, `rank`, ...) is read and each literal default (a
number, true/false, null/none, a `name`) compared with the dataclass that holds it. A row whose
default is prose ("the cluster's default partition") is not compared, but each table must have
some rows that are, so a table cannot drift out of the check unnoticed.
"""

import argparse
import re
from pathlib import Path

import pytest

from efficient_rl.cli import parser
from efficient_rl.config.schema import LoraSection, Recipe, VLLMSection
from efficient_rl.study.spec import Study

DOCS = Path(__file__).resolve().parent.parent / "docs"
NOT_A_LITERAL = object()
UNKNOWN = object()


def field_at(root):
    """A resolver of dotted field paths from `root` (UNKNOWN where there is no such field)."""

    def resolve(key: str):
        node = root
        for part in key.split("."):
            if not hasattr(node, part):
                return UNKNOWN
            node = getattr(node, part)
        return node

    return resolve


def flag_of(command: str):
    """A resolver of a command's flags (`--max-shard-mb`) to the defaults its parser gives them."""
    commands = next(action for action in parser()._actions if isinstance(action, argparse._SubParsersAction))
    subparser = commands.choices[command]
    dests = {option: action.dest for action in subparser._actions for option in action.option_strings}
    return lambda key: subparser.get_default(dests[key]) if key in dests else UNKNOWN


# A key of each table checked -> how its keys resolve to the code's defaults.
TABLES = {
    "prompt.chat_template": field_at(Recipe()),  # docs/engines.md
    "learner.micro_batch_size": field_at(Recipe()),  # docs/engines.md
    "learner.head_token_tile": field_at(Recipe()),  # docs/engines.md
    "gpu_memory_utilization": field_at(VLLMSection()),  # docs/engines.md, rollout.vllm
    "cluster.weight_transport": field_at(Recipe()),  # docs/engines.md
    "rollout.thinking_budget.tokens": field_at(Recipe()),  # docs/engines.md
    "--force-answer": flag_of("eval"),  # docs/evaluation.md
    "learner.max_skipped_steps": field_at(Recipe()),  # docs/reliability.md
    "rank": field_at(LoraSection()),  # docs/lora.md
    "seeds": field_at(Study(runs=[])),  # docs/studies.md
    "--nodes": flag_of("submit"),  # docs/slurm.md
    "--keep": flag_of("merge"),  # docs/merging.md
}


def tables(text: str):
    """(header cells, rows of cells) of every markdown table in `text`."""
    lines = text.splitlines() + [""]
    start = None
    for index, line in enumerate(lines):
        if line.strip().startswith("|"):
            start = index if start is None else start
        elif start is not None:
            block = [[cell.strip() for cell in row.strip().strip("|").split("|")] for row in lines[start:index]]
            if len(block) > 2:
                yield block[0], block[2:]
            start = None


def literal(cell: str):
    """The value a default cell states, or NOT_A_LITERAL for prose."""
    text = cell.strip().strip("`").split(" (")[0].strip().strip("`")
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("null", "none"):
        return None
    try:
        return float(text)
    except ValueError:
        pass
    return text if cell.strip().startswith("`") and re.fullmatch(r"[\w.:/{}-]+", text) else NOT_A_LITERAL


def documented_defaults():
    """(doc, the table's key in TABLES, key, documented default, code default) of every row that
    states a literal default for a key the code knows."""
    rows = []
    for doc in sorted(DOCS.glob("*.md")):
        for header, body in tables(doc.read_text()):
            names = [cell.lower() for cell in header]
            keys = [row[0].strip("`").split()[0] for row in body if row and row[0].startswith("`")]
            table = next((key for key in keys if key in TABLES), None)
            if "default" not in names or table is None:
                continue
            for key, row in zip(keys, (row for row in body if row and row[0].startswith("`"))):
                stated, actual = literal(row[names.index("default")]), TABLES[table](key)
                if stated is not NOT_A_LITERAL and actual is not UNKNOWN:
                    rows.append((doc.name, table, key, stated, actual))
    return rows


def test_every_listed_table_is_found_and_checked():
    checked = {table for _, table, *_ in documented_defaults()}
    assert checked == set(TABLES), f"tables not found, or with no literal default: {set(TABLES) - checked}"


@pytest.mark.parametrize(
    "doc, table, key, stated, actual",
    documented_defaults(),
    ids=lambda value: str(value) if isinstance(value, str) else None,
)
def test_a_documented_default_is_the_code_default(doc, table, key, stated, actual):
    if isinstance(stated, float) and isinstance(actual, (int, float)) and not isinstance(actual, bool):
        actual = float(actual)
    if stated is None and actual in ([], {}):  # "none": nothing listed
        actual = None
    assert actual == stated, f"{doc}: {key} is documented as {stated!r}, the code says {actual!r}"


def test_the_reader_catches_a_wrong_default():
    table = "| key | default | meaning |\n|---|---|---|\n| `learner.micro_batch_size` | 31 | rows |\n"
    ((header, body),) = tables(table)
    assert literal(body[0][1]) == 31.0 != TABLES["learner.micro_batch_size"]("learner.micro_batch_size")
    assert literal("the cluster's default partition") is NOT_A_LITERAL
    assert literal("`auto`") == "auto" and literal("null (vLLM's)") is None
    assert TABLES["--nodes"]("--nodes") == 1 and TABLES["--nodes"]("--no-such-flag") is UNKNOWN


# ---------------------------------------------------------------- method entries
NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e-?\d+)?(?![\w.])")


def entry_tables():
    """(doc, registry, entry name, the numbers its `defaults` cell states) for every table whose
    header has a `defaults` column and whose first column names the entries of one registry."""
    from efficient_rl.driver.validate import CHOICE_FIELDS

    registries = [registry for _, registry in CHOICE_FIELDS]
    rows = []
    for doc in sorted(DOCS.glob("*.md")):
        for header, body in tables(doc.read_text()):
            names = [cell.lower() for cell in header]
            entries = [row[0].strip("`") for row in body if row]
            registry = next((r for r in registries if all(name in r for name in entries)), None)
            if "defaults" in names and registry is not None:
                rows += [
                    (
                        doc.name,
                        registry,
                        row[0].strip("`"),
                        {float(n) for n in NUMBER.findall(row[names.index("defaults")])},
                    )
                    for row in body
                ]
    return rows


def test_an_entry_table_states_each_numeric_default_of_its_entries():
    rows = entry_tables()
    assert {registry.kind for _, registry, *_ in rows} >= {"policy loss"}, "the policy loss table is not found"
    for doc, registry, name, stated in rows:
        defaults = {
            float(value)
            for value in registry.get(name).defaults().values()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        assert stated == defaults, (
            f"{doc}: {registry.kind} {name!r} states {sorted(stated)}, its defaults are {sorted(defaults)}"
        )
