"""Ray clusters: connecting a sweep's driver to a running cluster (`sweep --ray-address HOST:PORT`), and
starting nodes that stay on the loopback address for a cluster on one machine.

    ray start --head --port 6379 --num-cpus 4                              # on the head machine
    ray start --address HEAD_IP:6379 --num-cpus 4                          # on every other machine
    python -m jpq_core sweep configs/smoke.toml --ray-address HEAD_IP:6379 # from any of them

Token authentication (`RAY_AUTH_MODE=token`, Ray 2.60): the head makes a token its cluster's password when
RAY_AUTH_MODE=token is set or a token file exists when it starts (`ray get-auth-token --generate` writes one to
~/.ray/auth_token). Every node and every driver connecting by address must then set RAY_AUTH_MODE=token and
hold the same token (~/.ray/auth_token, the file RAY_AUTH_TOKEN_PATH names, or RAY_AUTH_TOKEN). Ray never
sends a token to an address given explicitly unless RAY_AUTH_MODE=token is set, so a driver without it is
refused; `connect` says so, naming the address, instead of Ray's retry loop and trace.

Loopback: Ray 2.60 replaces "127.0.0.1"/"localhost" in an address (and in --node-ip-address) by the machine's
network address (`ray._private.services.resolve_ip_for_localhost`), so a cluster meant to stay on one machine
talks over its network address. `connect` keeps a loopback address as given, and

    python -m jpq_core.cluster start --head --node-ip-address 127.0.0.1 --port 6379 ...   # any `ray start` flags

is `ray start` with the same fix, for nodes that advertise, and are reached at, 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys

from jpq_core.errors import JPQError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
CONNECT_TIMEOUT_S = 5  # a cluster that does not answer within this is reported, not waited for
AUTH_HELP = ("On the head machine, `ray get-auth-token` prints the cluster's token; here, set RAY_AUTH_MODE=token "
             "and give that token as RAY_AUTH_TOKEN=..., or in ~/.ray/auth_token, or in the file RAY_AUTH_TOKEN_PATH "
             "names (see README, 'Sweeps on a Ray cluster').")


def configured_address() -> str | None:
    """The cluster the app sends fine-tuning runs to: JPQ_RAY_ADDRESS (HOST:PORT), or None for this machine."""
    return os.environ.get("JPQ_RAY_ADDRESS", "").strip() or None


def parse_address(address: str) -> tuple[str, int]:
    """(host, port) of a HOST:PORT address ([::1]:PORT for IPv6); a JPQError says what is wrong otherwise."""
    host, sep, port = address.strip().rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise JPQError(f"--ray-address {address!r}: give HOST:PORT of the cluster's head (e.g. 10.0.0.5:6379, the "
                       "port of `ray start --head --port`), `auto` for the cluster started on this machine, or `local`.")
    return host, int(port)


def check_reachable(host: str, port: int, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """A JPQError naming the address when nothing accepts a connection there within `timeout_s`."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except ConnectionRefusedError:
        why = "the connection was refused (no Ray head listens on that port)"
    except socket.timeout:
        why = f"no answer within {timeout_s:g} s (a firewall, or a machine that is off)"
    except OSError as exc:  # unknown host, no route, ...
        why = exc.strerror or str(exc)
    raise JPQError(f"no Ray cluster at {host}:{port}: {why}. Start its head with `ray start --head --port {port}` "
                   "and give the head's address as --ray-address HOST:PORT.")


@contextlib.contextmanager
def loopback_kept():
    """While inside, Ray leaves 127.0.0.1, localhost and ::1 as they are instead of replacing them by this
    machine's network address (see the module's docstring)."""
    from ray._private import services

    replace = services.resolve_ip_for_localhost
    services.resolve_ip_for_localhost = lambda host: host if host in LOOPBACK_HOSTS else replace(host)
    try:
        yield
    finally:
        services.resolve_ip_for_localhost = replace


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _auth_problem(exc: BaseException) -> str | None:
    """What to tell the user when Ray's connection failure was a refused or missing token, else None."""
    chain, seen = [], exc
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    text = " ".join(f"{type(e).__name__}: {e}" for e in chain)
    if "AuthenticationError" not in text and "InvalidAuthToken" not in text and "authentication token" not in text:
        return None
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return "it asks for a token and this process sends none (RAY_AUTH_MODE is not `token` here)."
    if "no authentication token was found" in text:
        return "RAY_AUTH_MODE=token is set but no token was found here."
    return "it refused the token given here (not the token its head was started with)."


def connect(address: str, runtime_env: dict, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Connect this process, as a Ray driver, to the cluster at `address` ("auto": the one started on this
    machine; "local": start one in this process; HOST:PORT: the cluster whose head listens there, reached at
    exactly that address). A missing, refusing or token-protected cluster is a JPQError naming the address,
    within about `timeout_s` seconds."""
    import ray

    if address == "local":
        ray.init(runtime_env=runtime_env, log_to_driver=False)
        return
    where = address
    host = None
    if address != "auto":
        host, port = parse_address(address)
        check_reachable(host, port, timeout_s)
        where = f"{host}:{port}"
        address = f"[{host}]:{port}" if ":" in host else where
    keep = loopback_kept() if host in LOOPBACK_HOSTS else contextlib.nullcontext()
    try:
        # RAY_gcs_server_port_wait_time_s: how many ~1 s attempts Ray makes to reach the head (default 20)
        with keep, _env(RAY_gcs_server_port_wait_time_s=str(max(1, round(timeout_s)))):
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
    except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError or its own errors here
        problem = _auth_problem(exc)
        if problem:
            raise JPQError(f"the Ray cluster at {where} refused this connection: {problem} {AUTH_HELP}") from None
        raise JPQError(f"could not join the Ray cluster at {where}: {type(exc).__name__}: {exc}. Is a Ray head of the "
                       f"same Ray version ({ray.__version__}) running there?") from None


def node_id() -> str:
    """The id of the Ray node this task runs on (inside a Ray worker)."""
    import ray

    return ray.get_runtime_context().get_node_id()


def start_node(argv: list[str]) -> int:
    """`ray start ARGV` with loopback addresses kept as given: a node of a cluster on this machine only."""
    from ray.scripts.scripts import cli

    with loopback_kept():
        try:
            cli.main(["start", *argv], prog_name="ray", standalone_mode=False)
        except SystemExit as exc:
            return int(exc.code or 0)
        except Exception as exc:  # noqa: BLE001 - Ray's own message, without its trace
            print(f"ray start failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["start"]:
        sys.exit("usage: python -m jpq_core.cluster start [ray start options], e.g. --head --node-ip-address 127.0.0.1 "
                 "--port 6379")
    sys.exit(start_node(sys.argv[2:]))
