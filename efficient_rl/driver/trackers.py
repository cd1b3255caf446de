"""Experiment trackers: each step's metrics and sampled completions, sent where the recipe says.

A tracker is a registry entry (`logging.trackers: [tensorboard, {name: wandb, project: x}]`): its
keyword-only parameters are its recipe parameters, with their defaults in the signature. An
entry gets a TrackerContext and returns an object with `run_id`, `log(step, metrics,
completions)` and `close(failed)`. Every tracker receives the same metric names metrics.jsonl
holds (MLflow refuses `@` in a name: there `eval/pass@1` is `eval/pass_at_1`, see mlflow_name).

Resume: `trackers.json` in the run directory keeps each tracker's run id and the last step it
took. A resumed run continues the same tracker run (wandb `resume="allow"` with the id, MLflow
the same run id) and sends each tracker only the steps it does not have yet: no step twice.

A tracker that fails (its package missing, no network, a bad key, anything raised when it starts,
logs or closes) is reported in one line and dropped; training goes on. No package of a tracker
is imported before its entry runs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from efficient_rl.config.plan import Plan
from efficient_rl.errors import one_line
from efficient_rl.registry import Registry

TRACKERS: Registry = Registry("experiment tracker")
STATE_FILE = "trackers.json"
COMPLETIONS_TABLE = "completions"  # the name of the completions table in every tracker
INSTALL_HINT = "pip install 'efficient-rl[trackers]'"


@dataclass(frozen=True)
class TrackerContext:
    run_dir: Path
    run_name: str
    output_dir: Path
    config: dict  # the resolved recipe (Recipe.to_dict()): the tracker run's config
    run_id: str | None  # the tracker run a resume continues (from trackers.json); None: a new one
    first_step: int  # the first step this tracker will be sent


class Tracker(Protocol):
    run_id: str | None  # kept in trackers.json, so that a resume continues this run

    def log(self, step: int, metrics: dict[str, float], completions: list[dict]) -> None: ...

    def close(self, failed: bool) -> None: ...


def report(message: str) -> None:
    """One line on stderr, above the progress bar."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def described(err: BaseException) -> str:
    return f"{type(err).__name__}: {one_line(err, 300)}"


@dataclass
class Open:
    name: str
    tracker: Tracker
    first_step: int


class Trackers:
    """The recipe's trackers for one run: opened together, each failure reported once."""

    def __init__(self, run_dir: Path, plan: Plan, first_step: int):
        self.path = run_dir / STATE_FILE
        self.state = read_state(self.path)
        self.open: list[Open] = []
        recipe = plan.recipe
        config = recipe.to_dict()
        for bound in plan.trackers:
            saved = self.state.get(bound.name, {})
            # Steps a tracker already took before a kill (after the checkpoint) are not sent again.
            start = max(first_step, saved.get("last_step", 0) + 1)
            context = TrackerContext(
                run_dir=run_dir,
                run_name=recipe.logging.name,
                output_dir=Path(recipe.logging.output_dir),
                config=config,
                run_id=saved.get("run_id"),
                first_step=start,
            )
            try:
                tracker = bound(context)
            except Exception as err:  # a tracker never stops training
                self.failed(bound.name, "to start", err)
                continue
            self.open.append(Open(bound.name, tracker, start))
            self.state[bound.name] = {"run_id": tracker.run_id, "last_step": start - 1}
        self.save()

    def failed(self, name: str, when: str, err: BaseException) -> None:
        hint = f" ({INSTALL_HINT})" if isinstance(err, ImportError) else ""
        report(f"tracker {name} failed {when}, training goes on without it: {described(err)}{hint}")

    def log(self, step: int, metrics: dict[str, float], completions: list[dict]) -> None:
        for item in list(self.open):
            if step < item.first_step:
                continue
            try:
                item.tracker.log(step, metrics, completions)
            except Exception as err:
                self.failed(item.name, f"at step {step}", err)
                self.open.remove(item)
                self.close_quietly(item)
                continue
            self.state[item.name]["last_step"] = step
        self.save()

    def close(self, failed: bool = False) -> None:
        for item in self.open:
            try:
                item.tracker.close(failed)
            except Exception as err:
                self.failed(item.name, "to close", err)
        self.open = []

    @staticmethod
    def close_quietly(item: Open) -> None:
        """A tracker dropped after a failure still releases what it holds (wandb's service)."""
        try:
            item.tracker.close(True)
        except Exception:
            pass  # its failure is reported already

    def save(self) -> None:
        if not self.state:
            return
        staging = self.path.with_name(f".tmp-{self.path.name}")
        staging.write_text(json.dumps(self.state, indent=1))
        os.replace(staging, self.path)


def read_state(path: Path) -> dict:
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        report(f"{path}: unreadable ({described(err)}); trackers start new runs")
        return {}
    return state if isinstance(state, dict) else {}


# ---------------------------------------------------------------- tensorboard


@TRACKERS.register("tensorboard", source="TensorBoard event files in <run>/tensorboard (torch.utils.tensorboard)")
def tensorboard(context: TrackerContext) -> Tracker:
    return TensorBoardTracker(context)


class TensorBoardTracker:
    run_id = None  # the event files of the run directory are the run

    def __init__(self, context: TrackerContext):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events a killed run wrote past its last logged step are hidden on resume
        self.writer = SummaryWriter(str(context.run_dir / "tensorboard"), purge_step=context.first_step)

    def log(self, step: int, metrics: dict[str, float], completions: list[dict]) -> None:
        for name, value in metrics.items():
            if not math.isnan(value):
                self.writer.add_scalar(name, value, step)
        for name, counts in count_families(metrics).items():
            self.add_histogram(name, counts, step)
        if completions:
            self.writer.add_text(COMPLETIONS_TABLE, markdown_table(completions), step)

    def add_histogram(self, name: str, counts: dict[int, float], step: int) -> None:
        """A histogram of integer values from their counts, one bucket per value."""
        values = sorted(counts)
        taken = [value for value in values if counts[value] > 0]
        if not taken:
            return
        self.writer.add_histogram_raw(
            name,
            min=taken[0],
            max=taken[-1],
            num=sum(counts.values()),
            sum=sum(v * counts[v] for v in values),
            sum_squares=sum(v * v * counts[v] for v in values),
            bucket_limits=[value + 0.5 for value in values],  # bucket k holds (k - 0.5, k + 0.5]
            bucket_counts=[counts[value] for value in values],
            global_step=step,
        )

    def close(self, failed: bool) -> None:
        self.writer.close()


COUNT_METRIC = re.compile(r"^(?P<family>.+)/count/(?P<value>\d+)$")


def count_families(metrics: dict[str, float]) -> dict[str, dict[int, float]]:
    """Metrics named <family>/count/<k> (how many items took the integer value k), by family:
    pipeline/staleness/count/0, /1, ... are the step's rollouts at each policy lag."""
    families: dict[str, dict[int, float]] = {}
    for name, value in metrics.items():
        match = COUNT_METRIC.match(name)
        if match and not math.isnan(value):
            families.setdefault(match["family"], {})[int(match["value"])] = value
    return families


def markdown_table(rows: list[dict]) -> str:
    """Rows as a Markdown table (TensorBoard's text plugin renders it)."""
    columns = list(rows[0])

    def cell(value) -> str:
        return " ".join(str(value).split()).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- wandb


@TRACKERS.register("wandb", source="Weights & Biases: wandb.init, Run.log, wandb.Table")
def wandb_tracker(
    context: TrackerContext,
    *,
    project: str = "efficient-rl",
    entity: str | None = None,
    mode: Literal["online", "offline"] | None = None,
    group: str | None = None,
    tags: list[str] = [],
    system_metrics: bool = False,
) -> Tracker:
    """mode null: wandb's own choice ($WANDB_MODE, `wandb offline`, else online). Offline runs are
    written to <run>/wandb/offline-run-*; `wandb sync` uploads them later, a resumed run's parts
    into the one run. system_metrics: wandb's CPU/GPU sampling and machine metadata (off: wandb
    then probes nothing on the machine or its network)."""
    return WandbTracker(
        context, project=project, entity=entity, mode=mode, group=group, tags=tags, system_metrics=system_metrics
    )


class WandbTracker:
    def __init__(self, context: TrackerContext, *, project, entity, mode, group, tags, system_metrics):
        import wandb

        self.wandb = wandb
        settings = wandb.Settings(
            console="off",  # the progress bar and the driver's output stay as they are
            silent=True,
            save_code=False,
            x_disable_stats=not system_metrics,
            x_disable_meta=not system_metrics,
            x_disable_machine_info=not system_metrics,
        )
        try:
            self.run = wandb.init(
                project=project,
                entity=entity,
                name=context.run_name,
                group=group,
                tags=tags or None,
                dir=str(context.run_dir),
                mode=mode,
                config=context.config,
                id=context.run_id,
                resume="allow" if context.run_id else None,
                allow_val_change=True,  # `steps` may change on a resume
                reinit="create_new",  # never log into a wandb run someone else started in this process
                settings=settings,
            )
        except BaseException:
            self.stop_service()  # init may have started it before it failed
            raise
        self.run_id = self.run.id

    def log(self, step: int, metrics: dict[str, float], completions: list[dict]) -> None:
        record = dict(metrics)
        if completions:
            columns = list(completions[0])
            record[COMPLETIONS_TABLE] = self.wandb.Table(
                columns=columns, data=[[row[c] for c in columns] for row in completions]
            )
        self.run.log(record, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)
        self.stop_service()

    def stop_service(self) -> None:
        if self.wandb.run is None:  # no other wandb run in this process: stop the service ours started
            self.wandb.teardown()


# ---------------------------------------------------------------- mlflow

MLFLOW_NAME_CHARACTERS = re.compile(r"[^/\w.\- :]")  # MLflow refuses any other character in a name
MLFLOW_BATCH = 100  # MLflow's most params (and our metrics) per log_batch call


def mlflow_name(name: str) -> str:
    """A metric or parameter name as MLflow accepts it: `@` reads `_at_`, any other refused character `_`."""
    return MLFLOW_NAME_CHARACTERS.sub(lambda match: "_at_" if match.group() == "@" else "_", name)


@TRACKERS.register("mlflow", source="MLflow Tracking: MlflowClient.log_batch, log_table, log_dict")
def mlflow_tracker(
    context: TrackerContext, *, tracking_uri: str | None = None, experiment: str = "efficient-rl"
) -> Tracker:
    """tracking_uri null: $MLFLOW_TRACKING_URI, else a SQLite store shared by the output
    directory's runs, <output_dir>/mlflow.db (artifacts beside it in <output_dir>/mlflow-artifacts):
    `mlflow ui --backend-store-uri sqlite:///<output_dir>/mlflow.db` shows them."""
    return MlflowTracker(context, tracking_uri=tracking_uri, experiment=experiment)


SQLITE_PREFIX = "sqlite:///"  # then the database's path: relative, or absolute with a fourth slash
SQLITE_LOCK_WAIT = 30.0  # seconds another run's write may hold the shared store before the probe fails


def check_sqlite_store(path: Path) -> None:
    """Take the store's write lock once and let it go, so that a store that cannot be written (a
    read-only directory, a path under a file) fails at once in one line: MLflow's own engine would
    retry it for about 100 s, warning at each try, before the first step."""
    import sqlite3

    path.parent.mkdir(parents=True, exist_ok=True)  # as MLflow does
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=SQLITE_LOCK_WAIT)) as connection:
            connection.execute("BEGIN IMMEDIATE")
            connection.rollback()
    except sqlite3.Error as err:
        raise OSError(f"the MLflow store {path} cannot be written ({err})") from None


class MlflowTracker:
    def __init__(self, context: TrackerContext, *, tracking_uri, experiment):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # read when mlflow is imported
        from mlflow.tracking import MlflowClient

        artifacts = None
        if tracking_uri is None:
            tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
        if tracking_uri is None:
            store = context.output_dir.resolve()
            tracking_uri, artifacts = f"sqlite:///{store / 'mlflow.db'}", (store / "mlflow-artifacts").as_uri()
        if tracking_uri.startswith(SQLITE_PREFIX):
            check_sqlite_store(Path(tracking_uri.removeprefix(SQLITE_PREFIX)))
        self.client = MlflowClient(tracking_uri=tracking_uri)
        if context.run_id is not None:
            self.run_id = self.client.get_run(context.run_id).info.run_id  # raises when it is gone
            self.client.update_run(self.run_id, status="RUNNING")
            return
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.create_experiment(experiment, artifacts)
        self.run_id = self.client.create_run(
            experiment_id, run_name=context.run_name, tags={"efficient_rl.run_dir": str(context.run_dir.resolve())}
        ).info.run_id
        from mlflow.entities import Param

        params = [Param(mlflow_name(key), value) for key, value in flat_params(context.config).items()]
        for start in range(0, len(params), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=params[start : start + MLFLOW_BATCH])
        self.client.log_dict(self.run_id, context.config, "config.yaml")  # the recipe whole, as YAML

    def create_experiment(self, name: str, artifacts: str | None) -> str:
        try:
            return self.client.create_experiment(name, artifact_location=artifacts)
        except Exception:  # another run created it just now
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def log(self, step: int, metrics: dict[str, float], completions: list[dict]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(mlflow_name(name), value, now, step) for name, value in metrics.items()]
        for start in range(0, len(batch), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, metrics=batch[start : start + MLFLOW_BATCH])
        if completions:
            # One artifact per step: a resumed run writing a step again replaces it, never appends.
            columns = {c: [row[c] for row in completions] for c in completions[0]}
            self.client.log_table(self.run_id, columns, f"{COMPLETIONS_TABLE}/step-{step:08d}.json")

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """The recipe as MLflow parameters: dotted keys; lists and scalars as their JSON text."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flat_params(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if not isinstance(value, str) else value
    return flat
