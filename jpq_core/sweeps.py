"""Sweeps: a grid of compression configurations, run on a local process pool or a Ray cluster, one row each.

    python -m jpq_core sweep configs/resnet20-tradeoffs.toml            # run (or finish) a grid
    python -m jpq_core sweep GRID.toml --workers 4                      # four local worker processes
    python -m jpq_core sweep GRID.toml --ray-address auto               # configurations as Ray tasks

A grid file (TOML) holds one or more `[[grid]]` blocks; each block is the product of its axes
    network, criterion, granularity, sparsity, wbits, abits, pipeline, finetune, budget (steps), seed
(a list, or one value; "float" for float bits) and may fix any other `CompressionConfig` field
(`calibration = "percentile"`); `recovery` may be a list too (`recovery = ["none", "lsq"]`): one more axis.
Keys at the top level apply to every block. `granularity` filters the criteria by level (weight or channel); with `finetune = "none"` the budget is 0.

The table (`cached_runs/results/sweeps.jsonl`, or the file JPQ_RESULTS names) is append-only, one JSON object per line: the configuration
axes, every metric and cost figure of `compress` flattened, achieved sparsity, wall time, library versions,
the code revision, and a CRC of the row. Only the driver writes; each row is one `write` of a whole line,
fsync'd, so a sweep killed at any moment leaves at most a torn last line, which the reader reports and the
next sweep removes before running that configuration again. A row is keyed by its full configuration:
running a grid again skips what is done. Fine-tuned networks on the Pareto front (memory against the
network's headline metric) are kept beside the table in `checkpoints/` (`save_compressed` files).
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
import subprocess
import tempfile
import time
import tomllib
import zlib
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from jpq_core.errors import JPQError
from jpq_core.pipeline import CompressionConfig, config_identity

ROOT = Path(__file__).resolve().parents[1]
# The table the CLI and the app read and write; JPQ_RESULTS points them (and the app's fine-tuning jobs, kept beside
# it) at another one, e.g. a scratch table in tests.
RESULTS = Path(os.environ.get("JPQ_RESULTS") or ROOT / "cached_runs" / "results" / "sweeps.jsonl")
AXES = ("network", "criterion", "granularity", "sparsity", "wbits", "abits", "pipeline", "finetune", "budget", "seed")
# Columns every row has (the metrics differ by task and are checked by the report, not here).
REQUIRED = (*AXES, "id", "config", "achieved_sparsity", "memory_ratio", "bops_ratio", "wall_s", "git_rev")
LIST_SETTINGS = ("recovery",)  # settings that may also be given as a list: one more axis of the grid
_SETTINGS = {f.name for f in fields(CompressionConfig)} - {"network", "criterion", "sparsity", "wbits", "abits",
                                                           "pipeline", "finetune", "steps", "seed"}


# ---- grids ------------------------------------------------------------------------------------------------


def _bits_value(v):
    return None if v in ("float", None) else v


def _as_list(v):
    return list(v) if isinstance(v, list) else [v]


def expand_grid(spec: dict, source: str = "grid") -> list[CompressionConfig]:
    """Every configuration of a parsed grid file, checked, without duplicates, in file order."""
    from jpq_core.registry import get_criterion

    blocks = spec.get("grid")
    if not isinstance(blocks, list) or not blocks:
        raise JPQError(f"{source}: no [[grid]] block; a grid file lists its axes under [[grid]] (see configs/).")
    shared = {k: v for k, v in spec.items() if k not in ("grid", "description")}
    configs, seen = [], set()
    for n, block in enumerate(blocks, 1):
        block = {**shared, **block}
        unknown = sorted(set(block) - set(AXES) - _SETTINGS)
        if unknown:
            raise JPQError(f"{source}, grid block {n}: unknown key {', '.join(unknown)}; axes are {', '.join(AXES)}, "
                           f"fixed settings any of {', '.join(sorted(_SETTINGS))}.")
        if "network" not in block or "criterion" not in block:
            raise JPQError(f"{source}, grid block {n}: give at least `network` and `criterion`.")
        defaults = CompressionConfig()
        axes = {a: _as_list(block.get(a, getattr(defaults, a, None))) for a in AXES}
        axes["budget"] = _as_list(block.get("budget", defaults.steps))
        levels = set(axes["granularity"]) if "granularity" in block else {"weight", "channel"}
        settings = {k: v for k, v in block.items() if k in _SETTINGS and k not in LIST_SETTINGS}
        listed = [[(k, v) for v in _as_list(block[k])] for k in LIST_SETTINGS if k in block]
        for (net, crit, _, sp, wb, ab, pipe, ft, budget, seed), *extra in itertools.product(
                itertools.product(*(axes[a] for a in AXES)), *listed):
            settings.update(extra)
            try:
                if get_criterion(crit).level not in levels:
                    continue
                config = CompressionConfig(network=net, criterion=crit, sparsity=sp, wbits=_bits_value(wb),
                                           abits=_bits_value(ab), pipeline=pipe, finetune=ft,
                                           steps=0 if ft == "none" else budget, seed=seed, **settings).check()
            except (JPQError, TypeError, ValueError) as exc:
                raise JPQError(f"{source}, grid block {n}: {exc}") from None
            key = config_key(config)
            if key not in seen:
                seen.add(key)
                configs.append(config)
    return configs


def load_grid(path) -> list[CompressionConfig]:
    path = Path(path)
    try:
        spec = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise JPQError(f"{path}: no such grid file; grids live in configs/ (e.g. configs/smoke.toml).") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise JPQError(f"{path}: not a valid TOML grid ({str(exc)[:160]}).") from None
    return expand_grid(spec, str(path))


def config_key(config: CompressionConfig | dict) -> str:
    """The full configuration as canonical JSON: what makes two rows the same run."""
    return json.dumps(config_identity(config), sort_keys=True)


def row_id(key: str) -> str:
    return hashlib.sha1(key.encode()).hexdigest()[:12]


# ---- one configuration ------------------------------------------------------------------------------------


_loaded: dict = {}  # per worker process: network -> (model, task), loaded once


def _network_and_task(network: str):
    if network not in _loaded:
        from jpq_core.models import load_network
        from jpq_core.tasks import make_task

        _loaded[network] = (load_network(network), make_task(network))
    return _loaded[network]


def engine_latency_ms(net, network: str, repeats: int = 3) -> float | None:
    """Median milliseconds of the sparse integer engine (`jpq_core.engine`) on one input at the network's
    evaluation size, after a warm-up run; None when the engine is missing or cannot lower this network
    (e.g. float weights)."""
    try:
        from jpq_core.engine.bench import bench_inputs
        from jpq_core.engine.program import compile_network
    except ImportError:
        return None
    try:
        program = compile_network(net)
    except JPQError:
        return None
    inputs = bench_inputs(network, 1)
    program.run(*inputs)  # first call: kernels compile or load from numba's cache
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        program.run(*inputs)
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def versions() -> dict:
    from jpq_core.checkpoints import library_versions

    out = library_versions()
    for name in ("numba", "pandas", "torch_pruning"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    return out


def row_from_report(report: dict, wall_s: float) -> dict:
    """One table row from a `compress` report: the axes, then metrics, dense metrics and costs, flat."""
    c = report["config"]
    row = {"network": c["network"], "criterion": c["criterion"], "granularity": report["granularity"],
           "sparsity": c["sparsity"], "wbits": c["wbits"], "abits": c["abits"], "pipeline": c["pipeline"],
           "finetune": c["finetune"], "budget": c["steps"] if c["finetune"] != "none" else 0, "seed": c["seed"]}
    key = config_key(c)
    row.update(id=row_id(key), config=c, achieved_sparsity=report["sparsity"],
               finetune_steps=report.get("finetune_steps"), wall_s=round(wall_s, 2))
    row.update(report["metrics"])
    row.update({f"dense_{k}": v for k, v in report["dense_metrics"].items()})
    row.update({k: v for k, v in report["cost"].items() if k not in ("assumptions", "sparsity", "layers")})
    return row


def run_config(config: dict, keep_checkpoint: bool = False, engine: bool = False, threads: int = 1,
               state: str | None = None, training=None) -> dict:
    """Compress with one configuration (a dict of `CompressionConfig` fields); returns the row, plus the
    compressed network's files as bytes under "_files" when `keep_checkpoint` (so that a Ray worker on
    another machine can hand them to the driver). `engine`: also time the engine (column engine_ms).
    `state`: a file that keeps the run's progress, so that a sweep killed in a long configuration goes on
    from its last save when run again (see `pipeline.RunState`). `training(done, total, loss)`: told after every
    fine-tuning step (see `pipeline.compress`)."""
    import torch

    from jpq_core.pipeline import compress, save_compressed

    torch.set_num_threads(threads)
    cfg = CompressionConfig(**config)
    model, task = _network_and_task(cfg.network)
    start = time.time()
    net, report = compress(model, task, cfg, state=state, training=training)
    wall = time.time() - start
    row = row_from_report(report, wall)
    row["engine_ms"] = engine_latency_ms(net, cfg.network) if engine else None
    row["versions"] = versions()
    if keep_checkpoint:
        with tempfile.TemporaryDirectory() as tmp:
            saved = save_compressed(net, Path(tmp) / "net", report)
            row["_files"] = {p.suffix: p.read_bytes() for p in (saved, saved.with_suffix(".json"))}
    return row


def import_reports(source, path=RESULTS, provenance: str = "imported") -> tuple[int, list[str]]:
    """Add `compress --json` reports (one JSON object per line of `source`, e.g. the older
    `compress_runs.jsonl`) to the table as rows, skipping configurations already there.
    Their revision is unrecorded: `git_rev` says where they came from. A report whose network was saved
    (`compress --save`; its "saved" path, relative to the current folder) brings that network along when
    its row is on the Pareto front, as a sweep's own rows do. Returns (rows added, problems)."""
    source = Path(source)
    path = Path(path)
    added, problems = 0, []
    with _TableLock(path):
        repair_tail(path)
        rows, _ = read_rows(path)
        done = {config_key(r["config"]) for r in rows}
        for number, line in enumerate(source.read_text().splitlines(), 1):
            try:
                report = json.loads(line)
                report["config"] = asdict(CompressionConfig(**report["config"]).check())
                row = row_from_report(report, report.get("wall_seconds", report.get("seconds", 0.0)))
            except (ValueError, KeyError, TypeError, RecursionError, JPQError) as exc:
                problems.append(f"{source}: line {number} is not a compress report ({type(exc).__name__}: {exc}); skipped.")
                continue
            if config_key(row["config"]) in done:
                continue
            row.update(engine_ms=None, versions=report.get("versions", {}), git_rev=provenance, grid=provenance)
            append_row(path, row)
            done.add(config_key(row["config"]))
            added += 1
            saved = Path(report["saved"]) if report.get("saved") else None
            if saved and saved.exists() and saved.with_suffix(".json").exists():
                rows.append(row)
                keep_front_checkpoints(path, rows, {row["id"]: {p.suffix: p.read_bytes()
                                                                for p in (saved, saved.with_suffix(".json"))}})
    return added, problems


# ---- the table ----------------------------------------------------------------------------------------------


def _crc(row: dict) -> str:
    body = json.dumps({k: v for k, v in row.items() if k != "crc"}, sort_keys=True)
    return f"{zlib.crc32(body.encode()):08x}"


def read_rows(path=RESULTS) -> tuple[list[dict], list[str]]:
    """(complete rows, problems) of a results table. A line that is cut short, is not JSON, fails its CRC or
    lacks a column is left out and named in `problems` with the file and line; the good rows are kept."""
    path = Path(path)
    if not path.exists():
        return [], []
    if not path.is_file():
        raise JPQError(f"{path}: not a file; give the path of a results table (.jsonl).")
    data = path.read_bytes()
    rows, problems = [], []
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        last = number == len(lines)  # no newline after it: the write of this row never finished
        try:
            row = json.loads(raw)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except (ValueError, RecursionError):  # RecursionError: a line nested deeper than the parser recurses
            why = "cut short (a sweep killed while writing it)" if last else "not valid JSON"
            problems.append(f"{path}: line {number} is {why}; it is skipped and its configuration will run again.")
            continue
        missing = [c for c in (*REQUIRED, "crc") if c not in row]
        if missing:
            problems.append(f"{path}: line {number} is not a sweep row (missing {', '.join(missing)}); skipped.")
        elif row["crc"] != _crc(row):
            problems.append(f"{path}: line {number} fails its checksum (edited or corrupted); skipped, it will run again.")
        else:
            rows.append(row)
    return rows, problems


def repair_tail(path) -> bool:
    """Cut a torn last line (no newline: a write that never finished) off the table; True if one was cut."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return False
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return False
        f.truncate(data.rfind(b"\n") + 1)
        f.flush()
        os.fsync(f.fileno())
    return True


def append_row(path, row: dict) -> None:
    """Append one row as one whole line in one write, fsync'd: either the row is there or it is not."""
    row = {**row, "crc": _crc(row)}
    line = (json.dumps(row, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


class _TableLock:
    """One sweep writes a table at a time: an advisory lock on the table file itself, held while it runs.
    `wait`: wait for the writer holding it (a page-started job adding its one row) instead of refusing."""

    def __init__(self, path: Path, wait: bool = False):
        self.path, self.wait = Path(path), wait

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(self.fd)
            raise JPQError(f"{self.path}: another sweep is writing this table; wait for it or give --out.") from None
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def table_lock(path, wait: bool = False) -> _TableLock:
    """The table's writer lock, for a context: refused (JPQError) while another writer holds it, unless `wait`."""
    return _TableLock(Path(path), wait)


# ---- Pareto front and its checkpoints ---------------------------------------------------------------------


def pareto_mask(xs, ys, x_lower_is_better: bool = True, y_lower_is_better: bool = True) -> list[bool]:
    """For each point, whether no other point is at least as good in both and better in one."""
    sx = 1 if x_lower_is_better else -1
    sy = 1 if y_lower_is_better else -1
    pts = [(sx * x, sy * y) for x, y in zip(xs, ys)]
    return [not any(a <= x and b <= y and (a < x or b < y) for a, b in pts) for x, y in pts]


def primary_metric(network: str) -> tuple[str, bool]:
    """(column, higher is better) of a network's headline metric."""
    from jpq_core.models import task_of

    return ("bad3", False) if task_of(network) == "stereo" else ("top1", True)


def checkpoint_dir(table: Path) -> Path:
    return table.parent / "checkpoints"


def front_ids(rows: list[dict]) -> set[str]:
    """Ids of the fine-tuned rows on each network's front of weight memory against its headline metric."""
    out = set()
    for network in {r["network"] for r in rows}:
        mine = [r for r in rows if r["network"] == network and r["finetune"] != "none"]
        metric, higher = primary_metric(network)
        mine = [r for r in mine if metric in r]
        on = pareto_mask([r["memory_ratio"] for r in mine], [r[metric] for r in mine], True, not higher)
        out |= {r["id"] for r, keep in zip(mine, on) if keep}
    return out


def write_checkpoint(table: Path, rid: str, parts: dict[str, bytes]) -> None:
    """Keep a row's compressed network ({suffix: bytes}, from `run_config(keep_checkpoint=True)`) beside the table."""
    from jpq_core.checkpoints import atomic_write_all

    atomic_write_all({checkpoint_dir(table) / f"{rid}{suffix}": lambda tmp, data=data: Path(tmp).write_bytes(data)
                      for suffix, data in parts.items()})


def keep_front_checkpoints(table: Path, rows: list[dict], files: dict[str, dict]) -> None:
    """Write the checkpoints in `files` ({row id: {suffix: bytes}}) of rows on the front, delete those that
    fell off it."""
    folder = checkpoint_dir(table)
    keep = front_ids(rows)
    for rid, parts in files.items():
        if rid in keep:
            write_checkpoint(table, rid, parts)
    if folder.exists():
        for f in folder.iterdir():
            if f.stem not in keep and f.suffix in (".safetensors", ".json"):
                f.unlink()


# ---- running a grid ---------------------------------------------------------------------------------------


def git_revision() -> str:
    """HEAD of the repository, with "+dirty" when the library's code differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "jpq_core"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@dataclass
class SweepSummary:
    total: int
    skipped: int
    ran: int
    failed: list[str]
    problems: list[str]
    seconds: float
    nodes: dict[str, int] = field(default_factory=dict)  # on Ray: configurations finished per node id

    def __str__(self):
        lines = [f"{self.total} configurations: {self.skipped} already in the table, {self.ran} run now, "
                 f"{len(self.failed)} failed ({self.seconds:.0f} s)."]
        if self.nodes:
            lines.append(f"  on {len(self.nodes)} Ray node(s): " +
                         ", ".join(f"{n} on {node[:12]}" for node, n in sorted(self.nodes.items())))
        lines += [f"  failed: {f}" for f in self.failed] + [f"  problem: {p}" for p in self.problems]
        return "\n".join(lines)


def state_file(table: Path, config: CompressionConfig) -> str:
    """Where a local sweep keeps the progress of a configuration while it runs (deleted when it is done)."""
    return str(table.parent / "state" / f"{row_id(config_key(config))}.pt")


def _pool_results(todo, workers: int, keep, engine: bool, table: Path):
    """Yield (config, row or exception) as local worker processes finish them."""
    if workers == 1:  # no pool to start: the same function in this process
        for c in todo:
            try:
                yield c, run_config(asdict(c), keep(c), engine, state=state_file(table, c))
            except Exception as exc:  # noqa: BLE001 - one failed configuration must not stop the sweep
                yield c, exc
        return
    import multiprocessing

    # spawn, not fork: a forked copy of a process with PyTorch's threads running can deadlock
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    pending = {pool.submit(run_config, asdict(c), keep(c), engine, 1, state_file(table, c)): c for c in todo}
    try:
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                c = pending.pop(fut)
                exc = fut.exception()
                yield c, exc if exc is not None else fut.result()
    finally:  # on Ctrl-C, do not wait for the configurations still running: their rows are simply not written
        pool.shutdown(wait=not pending, cancel_futures=True)


def ray_runtime_env() -> dict:
    """What Ray workers need: this checkout (code, shipped checkpoints, configs) as the job's working directory,
    so workers on other machines run the same code; the Python packages must be installed on every node."""
    return {"working_dir": str(ROOT), "excludes": [".venv", ".git", "runs", "cached_runs/results", "docs", "notebooks",
                                                   "__pycache__", ".hypothesis", ".pytest_cache", ".ruff_cache"]}


RAY_TASK_RETRIES = 3


def run_config_on_node(config: dict, keep_checkpoint: bool = False, engine: bool = False) -> tuple[str, dict]:
    """`run_config` as a Ray task: (the id of the node it ran on, the row)."""
    from jpq_core.cluster import node_id

    return node_id(), run_config(config, keep_checkpoint, engine)


def submit_to_ray(address: str, config: dict, keep_checkpoint: bool = False, engine: bool = False):
    """`run_config_on_node` as a Ray task on the cluster at `address` (connecting this process first unless Ray is
    already initialised); returns its ObjectRef. A task whose node or worker process dies is run again on another
    node (up to RAY_TASK_RETRIES times); its row comes back once, from the run that finished."""
    import ray

    from jpq_core import cluster

    if not ray.is_initialized():
        cluster.connect(address, ray_runtime_env())
    remote = ray.remote(num_cpus=1, max_retries=RAY_TASK_RETRIES)(run_config_on_node)
    return remote.remote(config, keep_checkpoint, engine)


def _ray_results(todo, address: str, keep, engine: bool, nodes: dict):
    """Yield (config, row or exception) as Ray tasks finish; rows come back to the driver, which writes them.
    `nodes` counts the configurations finished per Ray node id.
    `address` is "auto" (a running cluster), "local" (start one here) or HOST:PORT; an already initialised Ray
    (e.g. `ray.init(num_cpus=2, runtime_env=ray_runtime_env())`) is used as it is."""
    import ray

    # Rows come back to the driver, which writes them once each task has finished (see `submit_to_ray`).
    pending = {submit_to_ray(address, asdict(c), keep(c), engine): c for c in todo}
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                c = pending.pop(ref)
                try:
                    node, row = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - a task's error, reported in the summary
                    yield c, exc
                else:
                    nodes[node] = nodes.get(node, 0) + 1
                    yield c, row
    finally:
        for ref in pending:
            ray.cancel(ref)


def run_sweep(configs: list[CompressionConfig], path=RESULTS, workers: int | None = None,
              ray_address: str | None = None, grid: str = "", progress: bool = True,
              save_front: bool = True, engine: bool = False) -> SweepSummary:
    """Run every configuration not yet in the table at `path`, appending one row each as they finish.
    `engine`: time each compressed network on the sparse integer engine too (column engine_ms; timings
    are only comparable between rows measured on the same, otherwise idle, machine)."""
    from tqdm import tqdm

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with _TableLock(path):
        repair_tail(path)
        rows, problems = read_rows(path)
        done = {config_key(r["config"]) for r in rows}
        todo = [c for c in configs if config_key(c) not in done]
        keep = lambda c: save_front and c.finetune != "none"  # noqa: E731 - no-fine-tuning points rerun in seconds
        revision = git_revision()
        workers = workers or os.cpu_count() or 1
        nodes: dict[str, int] = {}
        results = (_ray_results(todo, ray_address, keep, engine, nodes) if ray_address
                   else _pool_results(todo, min(workers, max(1, len(todo))), keep, engine, path))
        failed = []
        bar = tqdm(total=len(todo), desc=f"sweep {grid}".strip(), unit="run", disable=not progress or not todo)
        for config, result in results:
            if isinstance(result, BaseException):
                failed.append(f"{config.network} {config.criterion} s={config.sparsity} w{config.wbits}a{config.abits} "
                              f"{config.pipeline} {config.finetune}/{config.steps}: {type(result).__name__}: {result}")
            else:
                files = result.pop("_files", None)
                result.update(git_rev=revision, grid=grid)
                if files and save_front:
                    keep_front_checkpoints(path, rows + [result], {result["id"]: files})
                append_row(path, result)
                rows.append(result)
            bar.update(1)
            bar.set_postfix_str(f"{config.network} {config.criterion} {config.sparsity} w{config.wbits}")
        bar.close()
        if save_front and rows:
            keep_front_checkpoints(path, rows, {})
    return SweepSummary(len(configs), len(configs) - len(todo), len(todo) - len(failed), failed, problems,
                        time.time() - start, nodes)
