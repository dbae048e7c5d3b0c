"""A real Ray cluster of two nodes on the loopback address only (a head and one more node, one CPU each, started
with `ray start` as a user would, token authentication on): a sweep given `--ray-address 127.0.0.1:PORT` runs
every configuration exactly once, on both nodes, with the local pool's rows, and no socket of the cluster
leaves 127.0.0.1; a missing or wrong token, and an address where nothing listens, are clear messages naming the
address within seconds; a node killed in the middle of a sweep has its configuration run again on the other,
and the table gets neither a partial nor a duplicated row. The cluster is stopped by its own process ids."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from jpq_core import cluster, sweeps
from jpq_core.errors import JPQError

ray = pytest.importorskip("ray")

GRID = """
network = "resnet20"
calibration_batches = 1
abits = 8
[[grid]]
criterion = "magnitude"
sparsity = {sparsities}
wbits = 4
finetune = "none"
"""
MEASURED = ("top1", "dense_top1", "achieved_sparsity", "weight_bits", "memory_ratio", "bops", "energy_pj")
LOOPBACK_HEX = ("0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000")  # /proc/net/tcp*


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat(pid: int) -> tuple[str, int] | None:
    """(command name, session id) of a process, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name = text[text.index("(") + 1:text.rindex(")")]
    return name, int(text[text.rindex(")") + 2:].split()[3])


class LoopbackCluster:
    """Ray nodes started by `python -m jpq_core.cluster start` (`ray start` keeping 127.0.0.1), each in a session
    of its own, so that every process of a node (also the workers it spawns) is found by its session id."""

    def __init__(self, root: Path):
        # a short folder: Ray's socket paths live under it and must stay under 108 characters
        self.folder = Path(tempfile.mkdtemp(prefix="jpqray", dir="/tmp"))
        self.root = root
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        token = self.folder / "token"
        token.write_text(os.urandom(16).hex())
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0",
                        PYTHONPATH=str(root))
        self.sessions: dict[str, int] = {}

    def start_node(self, name: str, *args: str) -> None:
        log = self.folder / f"{name}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "jpq_core.cluster", "start", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                 f"--object-store-memory={80 * 2**20}", f"--temp-dir={self.folder / name}", "--disable-usage-stats",
                 f"--dashboard-agent-listen-port={_free_port()}", *args],
                cwd=self.root, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.sessions[name] = proc.pid
        assert proc.wait(180) == 0, log.read_text()[-3000:]

    def processes(self, node: str | None = None) -> list[int]:
        wanted = {self.sessions[node]} if node else set(self.sessions.values())
        out = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and (stat := _stat(int(entry.name))) and stat[1] in wanted:
                out.append(int(entry.name))
        return out

    def raylet(self, node: str) -> int:
        return next(pid for pid in self.processes(node) if _stat(pid)[0] == "raylet")

    def stop(self) -> None:
        for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            for pid in self.processes():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + wait_s
            while self.processes() and time.time() < deadline:
                time.sleep(0.2)
        shutil.rmtree(self.folder, ignore_errors=True)

    def sweep(self, grid: Path, table: Path, env: dict | None = None) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "jpq_core", "sweep", str(grid), "--ray-address", self.address, "--out", str(table),
               "--quiet"]
        return subprocess.Popen(cmd, cwd=self.root, env=env or self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def loopback_cluster(root):
    c = LoopbackCluster(root)
    try:
        c.start_node("head", "--head", f"--port={c.port}", "--include-dashboard=false",
                     f"--dashboard-port={_free_port()}")
        c.start_node("node", f"--address={c.address}")
        c.head_id = re.search(rb"--node_id=(\w+)", Path(f"/proc/{c.raylet('head')}/cmdline").read_bytes()
                              .replace(b"\0", b" ")).group(1).decode()
        yield c
    finally:
        c.stop()
    assert not c.processes(), "a process of the test's cluster outlived it"


def _grid(tmp_path, sparsities) -> Path:
    path = tmp_path / "grid.toml"
    path.write_text(GRID.format(sparsities=sparsities))
    return path


def _nodes_line(output: str) -> dict[str, int]:
    """{node id: configurations} from the summary's "on N Ray node(s): 2 on ID, ..." line."""
    line = re.search(r"on \d+ Ray node\(s\): (.*)", output)
    assert line, output[-3000:]
    return {node: int(n) for n, node in re.findall(r"(\d+) on (\w+)", line.group(1))}


def _sockets(pids) -> list[tuple[str, str]]:
    """(local, remote) hex addresses of the TCP sockets the processes hold."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:  # a process that ended meanwhile
            continue
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                out.append((fields[1].split(":")[0], fields[2].split(":")[0]))
    return out


def test_a_sweep_on_a_loopback_cluster_runs_each_configuration_once_on_both_nodes(loopback_cluster, tmp_path):
    grid = _grid(tmp_path, "[0.3, 0.6, 0.9]")
    table = tmp_path / "cluster" / "results.jsonl"
    proc = loopback_cluster.sweep(grid, table)
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output[-3000:]
    nodes = _nodes_line(output)
    assert len(nodes) == 2 and sum(nodes.values()) == 3, output[-2000:]  # both nodes ran configurations

    rows, problems = sweeps.read_rows(table)
    assert problems == [] and len(rows) == 3 and len({r["id"] for r in rows}) == 3
    # every socket the cluster holds is bound to, and talks to, 127.0.0.1 only
    held = _sockets(loopback_cluster.processes())
    assert held and all(local in LOOPBACK_HEX for local, _ in held), held
    assert all(remote in LOOPBACK_HEX or set(remote) == {"0"} for _, remote in held), held

    pool_table = tmp_path / "pool" / "results.jsonl"
    sweeps.run_sweep(sweeps.load_grid(grid), pool_table, workers=1, progress=False)
    by_id = lambda path: {r["id"]: {k: r[k] for k in MEASURED} for r in sweeps.read_rows(path)[0]}  # noqa: E731
    assert by_id(table) == by_id(pool_table)


@pytest.mark.parametrize("token", [None, "wrong"])
def test_a_missing_or_wrong_token_is_named_within_seconds(loopback_cluster, token):
    env = dict(loopback_cluster.env)
    if token is None:
        env.pop("RAY_AUTH_MODE")
    else:
        wrong = loopback_cluster.folder / "wrong-token"
        wrong.write_text(os.urandom(16).hex())
        env["RAY_AUTH_TOKEN_PATH"] = str(wrong)
    script = ("import time, sys\nfrom jpq_core import cluster\nfrom jpq_core.errors import JPQError\n"
              f"start = time.time()\ntry:\n    cluster.connect({loopback_cluster.address!r}, {{}})\n"
              "except JPQError as exc:\n    print('JPQError', round(time.time() - start, 1), exc)\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=loopback_cluster.root, env=env, capture_output=True,
                         text=True, timeout=300).stdout
    found = re.search(r"JPQError ([\d.]+) (.*)", out)
    assert found, out
    seconds, message = float(found.group(1)), found.group(2)
    assert loopback_cluster.address in message and "RAY_AUTH_MODE=token" in message
    assert ("sends none" if token is None else "refused the token") in message
    assert seconds < 15, f"Ray's own retry loop (20 attempts) was not cut short: {seconds} s"


def test_no_cluster_at_the_address_is_a_clear_message():
    port = _free_port()  # nothing listens there now
    start = time.time()
    with pytest.raises(JPQError, match=rf"no Ray cluster at 127\.0\.0\.1:{port}: the connection was refused"):
        cluster.connect(f"127.0.0.1:{port}", {})
    assert time.time() - start < 10
    with pytest.raises(JPQError, match="give HOST:PORT"):
        cluster.connect("127.0.0.1", {})


def test_a_node_lost_mid_sweep_has_its_configuration_run_again_elsewhere(loopback_cluster, tmp_path):
    grid = _grid(tmp_path, "[0.2, 0.6]")
    table = tmp_path / "results.jsonl"
    proc = loopback_cluster.sweep(grid, table)
    try:
        deadline, running = time.time() + 300, None
        while running is None and time.time() < deadline and proc.poll() is None:
            running = next((pid for pid in loopback_cluster.processes("node")
                            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::run_config_on_node")), None)
            time.sleep(0.2)
        assert running, "no configuration ever ran on the second node"
        raylet = loopback_cluster.raylet("node")
        lost = re.search(rb"--node_id=(\w+)", Path(f"/proc/{raylet}/cmdline").read_bytes().replace(b"\0", b" "))
        os.kill(raylet, signal.SIGKILL)  # the node is lost with the configuration it runs
        output = proc.communicate(timeout=600)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-3000:]
    rows, problems = sweeps.read_rows(table)
    assert problems == [] and sorted(r["sparsity"] for r in rows) == [0.2, 0.6]  # each once, all whole
    # the configuration seen running on the lost node (its first) was finished by the head, as was the other
    assert _nodes_line(output) == {loopback_cluster.head_id[:12]: 2}, (lost.group(1), output[-2000:])


def test_the_pages_fine_tuning_command_goes_to_the_configured_cluster(monkeypatch):
    """With JPQ_RAY_ADDRESS set, Explore's command for a configuration without a cached fine-tuned run is a
    one-configuration sweep on that cluster: the same configuration, the same Ray path, a row the pages read."""
    import shlex

    from jpq_core.cli import _pairs, build_parser
    from jpq_core.live import LiveConfig, compress_command

    live = LiveConfig(network="resnet20", criterion="taylor", allocation="global", sparsity=0.7, wbits=4, abits=None)
    monkeypatch.delenv("JPQ_RAY_ADDRESS", raising=False)
    assert cluster.configured_address() is None
    assert " compress " in compress_command(live, ray_address=cluster.configured_address())
    monkeypatch.setenv("JPQ_RAY_ADDRESS", "10.0.0.5:6379")
    command = compress_command(live, ray_address=cluster.configured_address())
    args = build_parser().parse_args(shlex.split(command)[3:])
    assert args.func.__name__ == "cmd_sweep" and args.ray_address == "10.0.0.5:6379"
    (config,) = sweeps.expand_grid({"grid": [_pairs(args.one)]}, "--one")
    assert (config.network, config.criterion, config.allocation, config.sparsity, config.wbits, config.abits,
            config.finetune) == ("resnet20", "taylor", "global", 0.7, 4, None, "distill")
    with pytest.raises(JPQError, match="KEY=VALUE"):
        _pairs(["sparsity"])


def test_a_page_job_runs_as_a_ray_task_when_a_cluster_is_configured(loopback_cluster, tmp_path, monkeypatch):
    """With JPQ_RAY_ADDRESS set, a job started from the page runs its configuration as the sweeps' Ray task; its
    row and network come back and are written here, as a local job's are."""
    from jpq_core.jobs import JobQueue, finetune_config, new_owner
    from jpq_core.pipeline import CompressionConfig

    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):  # the job's process connects with the cluster's token
        monkeypatch.setenv(key, loopback_cluster.env[key])
    monkeypatch.setenv("JPQ_RAY_ADDRESS", loopback_cluster.address)
    queue = JobQueue(tmp_path / "results" / "sweeps.jsonl")
    owner = new_owner()
    config = CompressionConfig(network="resnet20", criterion="magnitude", sparsity=0.5, wbits=8, calibration_batches=1)
    job = queue.submit(owner, finetune_config(config, 4))
    try:
        deadline = time.time() + 600
        while job.active and time.time() < deadline:
            time.sleep(0.5)
            (job,) = queue.jobs_of(owner)[0]
    finally:
        for left in queue.jobs_of(owner)[0]:
            queue.cancel(owner, left.id)
    assert job.status == "done", (job, queue._last_output(job.id))
    assert job.ray_address == loopback_cluster.address
    rows = sweeps.read_rows(queue.table)[0]
    assert [r["id"] for r in rows] == [job.row_id] and rows[0]["grid"] == "page"
    assert (sweeps.checkpoint_dir(queue.table) / f"{job.row_id}.safetensors").exists()
