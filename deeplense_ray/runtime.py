"""The Ray runtime of a job: join a live cluster, or start a private local one (loopback, explicit auth).

Every job (simulate, train, tune, study, demo) connects through :func:`connect` (no job has its own helper):

- ``address="local"`` starts a fresh local runtime; ``address=<host:port>`` (or ``auto``, or $RAY_ADDRESS)
  joins that cluster and fails within seconds, naming the address, when nothing answers there;
- ``address=None`` joins $RAY_ADDRESS, else (``join_running=True``) the cluster recorded by the last
  ``ray start`` on this machine (``<ray temp dir>/ray_current_cluster``) when its GCS answers, else starts a
  local runtime. A record left behind by a killed cluster is reported and skipped: ``ray.init`` itself would
  retry the dead GCS for many minutes.

A local runtime started here listens on 127.0.0.1 only (GCS, raylet, dashboard, workers) and uses token
authentication with a token private to the process (``RAY_AUTH_TOKEN``, never written to ~/.ray), unless
``RAY_AUTH_MODE`` is set, which always wins. Joining a cluster sets ``RAY_AUTH_MODE`` explicitly too: token
when a token is given ($RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), else disabled. A cluster
on a routable (non-loopback) address is not joined with auth disabled (anyone who reaches it could run code
on it) unless ``DEEPLENSE_ALLOW_INSECURE_RAY=1`` says that is meant (:func:`check_insecure_head`).

:func:`pick_port_base` chooses the Ray ports of a batch job (jobscript.sh): a block below the Linux ephemeral
range, derived from the job id, moved to the next block while any of its ports is in use here.

:func:`check_cpu_room` is the one check that a training job leaves CPUs for the Ray Data read tasks that feed
it (used by jobs/train.py and by the tune settings): with every CPU held by training workers the readers are
never scheduled and the job waits forever.

:func:`remove_orphaned_placement_groups` re-applies Ray's own lifetime rule to placement groups that Ray
missed (a Train controller starting its worker group while its driver is being killed leaves one reserving
CPUs/GPUs for good); :func:`connect` runs it whenever it joins a cluster that was already running.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
#: Seconds one TCP connect to a GCS may take before the cluster counts as unreachable.
PROBE_TIMEOUT_S = 5.0
#: CPUs left free for the Ray Data read tasks that feed training workers.
DATA_RESERVE_CPUS: float = 1.0
#: Ray reads this at import: 0 makes a node started by ``ray.init`` keep 127.0.0.1 as its address (Ray
#: otherwise replaces a loopback ``_node_ip_address`` by the machine's routable address).
_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_PRELOAD_ENV = "RAY_preload_python_modules"
#: How often Ray Train's controller polls its workers (Ray's default 2 s). The end of a run is noticed at a
#: poll: with 2 s, ``fit()`` returned 5.6 s after the last epoch's report in a CPU train job here, with
#: 0.25 s 0.5 s (timeline "fit end"). Set for local runtimes (a user value wins); cluster.yaml and
#: jobscript.sh export it to their ``ray start``.
TRAIN_POLL_ENV, TRAIN_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"


#: Set to 1 to run or join a Ray cluster on a routable address with authentication disabled.
INSECURE_ENV = "DEEPLENSE_ALLOW_INSECURE_RAY"
#: Ports of one Ray node in a batch job, and where the blocks start (jobscript.sh lays them out).
PORT_BLOCK_SIZE, PORT_RANGE_LOW = 200, 10000
#: Linux's default ip_local_port_range starts here (ports the kernel hands to outgoing connections).
EPHEMERAL_DEFAULT_LOW = 32768


class RayConnectError(RuntimeError):
    """The Ray cluster to join does not answer, or may not be joined as asked (the message names the address
    and where it came from)."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP address or a name) is this machine's loopback only."""
    import ipaddress

    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def check_insecure_head(address: str, mode: str | None = None) -> None:
    """RayConnectError when the cluster at ``address`` (``host:port``) is on a routable address and Ray
    authentication is disabled (``mode``, default $RAY_AUTH_MODE), unless $DEEPLENSE_ALLOW_INSECURE_RAY=1."""
    mode = mode if mode is not None else os.environ.get("RAY_AUTH_MODE", "")
    if mode != "disabled" or os.environ.get(INSECURE_ENV) == "1":
        return
    host = address.split("://", 1)[-1].rstrip("/").rpartition(":")[0] or address
    if is_loopback(host):
        return
    raise RayConnectError(
        f"refusing RAY_AUTH_MODE=disabled for the Ray cluster at {address}: a routable address, so anyone "
        f"who reaches it could run code there. Use token auth (RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH "
        f"or RAY_AUTH_TOKEN), or set {INSECURE_ENV}=1 to accept that"
    )


def ephemeral_port_low() -> int:
    """First port of the kernel's ephemeral range (/proc/sys/net/ipv4/ip_local_port_range), else 32768."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return EPHEMERAL_DEFAULT_LOW


def busy_ports(base: int, size: int = PORT_BLOCK_SIZE) -> list[int]:
    """Ports of ``base .. base+size-1`` that cannot be bound here (TCP, all addresses) right now."""
    busy = []
    for port in range(base, base + size):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("", port))
            except OSError:
                busy.append(port)
    return busy


def pick_port_base(job_id: int, *, size: int = PORT_BLOCK_SIZE, low: int = PORT_RANGE_LOW,
                   high: int | None = None) -> int:
    """First port of a free block of ``size`` ports for a batch job's Ray node.

    The blocks tile ``[low, high)`` (``high``: the ephemeral range's start, so no port is one the kernel may
    give an outgoing connection); the job's block is ``job_id`` modulo their number, and while any port of it
    is in use here the next block is tried. RuntimeError when every block has a port in use.
    """
    high = ephemeral_port_low() if high is None else high
    blocks = (high - low) // size
    if blocks < 1:
        raise RuntimeError(f"no room for a block of {size} ports between {low} and {high}")
    first = int(job_id) % blocks
    for i in range(blocks):
        base = low + ((first + i) % blocks) * size
        if not busy_ports(base, size):
            return base
    raise RuntimeError(f"every block of {size} ports between {low} and {high} has a port in use")


def check_cpu_room(cluster: Mapping[str, float], need: float, *, what: str, detail: str, fix: str) -> None:
    """ValueError unless ``need`` CPUs plus :data:`DATA_RESERVE_CPUS` fit the cluster's CPUs.

    With every CPU held by training processes the Ray Data read tasks feeding them are never scheduled and
    the job waits forever ("backpressured: ResourceBudget").

    Args:
        cluster: ``ray.cluster_resources()`` (key 'CPU').
        need: CPUs the job's training processes hold at once; what: who needs them (``"a trial"``);
        detail: how ``need`` is made up; fix: what to change.
    """
    cpus = float(cluster.get("CPU", 0.0))
    if need + DATA_RESERVE_CPUS > cpus + 1e-9:
        raise ValueError(
            f"{what} needs {need:g} CPUs ({detail}) plus {DATA_RESERVE_CPUS:g} free for its Ray Data "
            f"readers, but the Ray cluster has {cpus:g} CPUs; {fix}"
        )


def local_cpus(need: float = 0.0) -> int:
    """Logical CPUs for a local runtime: the machine's cores, raised so ``need`` + the data readers fit.

    Logical CPUs are Ray's bookkeeping; the work runs as threads on the real cores either way.
    """
    return max(os.cpu_count() or 1, int(-(-(need + DATA_RESERVE_CPUS) // 1)))


def gcs_unreachable(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """None if a TCP connect to ``address`` (``host:port``, optionally ``ray://``) succeeds, else why not."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return None  # not host:port (e.g. a name Ray resolves itself): let ray.init decide
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return None
    except OSError as exc:
        return f"{type(exc).__name__}: {exc.strerror or exc}"


def recorded_cluster_file() -> Path:
    """Where ``ray start`` records the GCS address of the latest cluster on this machine."""
    from ray._common.utils import get_ray_address_file

    return Path(get_ray_address_file(None))


def set_auth_mode(*, local: bool) -> str:
    """Set ``RAY_AUTH_MODE`` (and for a local runtime a private token) explicitly; return what was chosen."""
    mode = os.environ.get("RAY_AUTH_MODE")
    has_token = bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"))
    if mode is None:
        token_file = (Path.home() / ".ray" / "auth_token").is_file()
        mode = "token" if local or has_token or token_file else "disabled"
        os.environ["RAY_AUTH_MODE"] = mode
    if local and mode == "token" and not has_token:
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # this process and the runtime it starts only
    from ray._raylet import Config

    Config.initialize("")  # Ray caches the mode it read at import; this process must see the one set here
    return f"auth {mode}"


def start_local_ray(*, preload_modules: Sequence[str] = (), **init_kwargs: Any) -> str:
    """Start a fresh local Ray runtime on 127.0.0.1 with explicit auth; return a description.

    ``preload_modules``: on a machine with a GPU, modules every Ray worker imports as it starts (Ray's
    ``RAY_preload_python_modules``; a user setting wins). ``init_kwargs`` go to ``ray.init``.
    """
    import ray
    import torch
    from ray._private import ray_constants

    if preload_modules and torch.cuda.is_available() and _PRELOAD_ENV not in os.environ:
        os.environ[_PRELOAD_ENV] = ",".join(preload_modules)
    os.environ.setdefault(TRAIN_POLL_ENV, TRAIN_POLL_S)  # inherited by the runtime's processes
    auth = set_auth_mode(local=True)
    saved_env, saved_flag = os.environ.get(_CLUSTER_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_CLUSTER_ENV] = "0"  # for the processes ray.init starts
    ray_constants.ENABLE_RAY_CLUSTER = False  # for this one, which read the variable at import
    try:
        ray.init(address="local", _node_ip_address=LOOPBACK, **init_kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(_CLUSTER_ENV, None)
        else:
            os.environ[_CLUSTER_ENV] = saved_env
    cpus = ray.cluster_resources().get("CPU", 0)
    return f"started a local Ray runtime on {LOOPBACK} ({cpus:g} logical CPUs, {auth})"


def _join(address: str, source: str, init_kwargs: Mapping[str, Any]) -> str:
    import ray

    why = gcs_unreachable(address)
    if why is not None:
        raise RayConnectError(
            f"no Ray cluster answers at {address} ({source}): {why}. Start it, or pass --address local "
            "for a fresh local runtime"
        )
    auth = set_auth_mode(local=False)
    check_insecure_head(address)
    ray.init(address=address, **init_kwargs)
    return f"joined {address} ({source}, {auth})"


def connect(
    address: str | None = None,
    *,
    join_running: bool = True,
    num_cpus: int | None = None,
    preload_modules: Sequence[str] = (),
    dashboard: bool = False,
    **init_kwargs: Any,
) -> str:
    """Join or start Ray per ``address`` (see the module docstring); return a one-line description.

    Args:
        address: None, ``"local"``, ``"auto"`` or a cluster address (``host:port``, ``ray://host:port``).
        join_running: with ``address=None`` and no $RAY_ADDRESS, join the cluster ``ray start`` recorded on
            this machine if it answers (False: always start a local runtime).
        num_cpus: logical CPUs of a local runtime (None: Ray's default, the machine's cores).
        preload_modules: see :func:`start_local_ray`.
        dashboard: start the Ray dashboard, listening on 127.0.0.1 only (``include_dashboard``,
            ``dashboard_host``; a search's progress page).
        init_kwargs: more ``ray.init`` arguments (e.g. ``log_to_driver=False``; a job's
            ``tracking.console.quiet_ray(verbose)``).

    Raises:
        RayConnectError: an address given by --address or $RAY_ADDRESS does not answer.
    """
    import ray

    if ray.is_initialized():
        return _with_orphans_removed("using the Ray runtime already initialised in this process")
    if dashboard:
        init_kwargs = {"include_dashboard": True, "dashboard_host": LOOPBACK, **init_kwargs}
    local_kwargs = dict(init_kwargs, preload_modules=preload_modules)
    if num_cpus is not None:
        local_kwargs["num_cpus"] = num_cpus
    if address == "local":
        return start_local_ray(**local_kwargs)
    env_address = os.environ.get("RAY_ADDRESS")
    if address is None and env_address:
        address, source = env_address, "RAY_ADDRESS"
    else:
        source = "--address"
    if address == "auto" or (address is None and join_running):
        record = recorded_cluster_file()
        recorded = record.read_text().strip() if record.is_file() else ""
        if address == "auto" and not recorded:
            raise RayConnectError(f"--address auto: no running Ray cluster is recorded in {record}")
        if not recorded:
            return start_local_ray(**local_kwargs)
        why = gcs_unreachable(recorded)
        if why is not None and address is None:
            how = start_local_ray(**local_kwargs)
            return f"the Ray cluster recorded in {record} ({recorded}) does not answer ({why}); {how}"
        address, source = recorded, f"recorded in {record}"
    if address is None:
        return start_local_ray(**local_kwargs)
    return _with_orphans_removed(_join(address, source, init_kwargs))


def _with_orphans_removed(how: str) -> str:
    n = remove_orphaned_placement_groups()
    return f"{how}; removed {n} placement group(s) left reserved by ended jobs" if n else how


def remove_orphaned_placement_groups() -> int:
    """Remove the placement groups whose lifetime is over by Ray's own rule but that Ray did not remove.

    Ray removes a placement group that is not detached once its creator job has ended and, if an actor
    created it, that actor is dead too. The GCS applies this rule when a job or an actor dies, to the groups
    registered at that moment, and registers a new group without checking its creator (Ray 2.60
    ``gcs_placement_group_manager.cc``). A group that arrives in between is never removed: a Ray Train
    controller that asks for its worker group's placement group while its driver is being killed (a search
    interrupted with SIGKILL while a trial starts) leaves one that holds its CPUs and GPUs until the cluster
    stops, and later trials wait for them. Reproduced here: an actor creating groups in a loop, its driver
    SIGKILLed, left 4 groups reserved for good (tests/test_runtime_cleanup.py).

    Reads the GCS tables directly (no dashboard / state API). Returns how many groups were removed.
    """
    import ray
    from ray._private import state as ray_state
    from ray._raylet import PlacementGroupID
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    if not ray.is_initialized():
        return 0
    table = gcs_pb2.PlacementGroupTableData
    accessor = ray_state.state._connect_and_get_accessor()
    groups = [table.FromString(raw) for raw in accessor.get_placement_group_table()]
    live = [g for g in groups if g.state != table.REMOVED and not g.is_detached]
    if not live:
        return 0
    dead_jobs = {j["JobID"] for j in ray_state.jobs() if j["IsDead"]}
    removed = 0
    for g in live:
        if g.creator_job_id.hex() not in dead_jobs:
            continue
        if not (g.creator_actor_dead or _actor_gone(ray_state, g.creator_actor_id)):
            continue  # e.g. an actor of the ended job that is still being stopped: its group goes with it
        try:
            remove_placement_group(PlacementGroup(PlacementGroupID(g.placement_group_id)))
            removed += 1
        except Exception as exc:  # removed meanwhile, or the GCS refused: nothing is lost by leaving it
            import logging

            logging.getLogger(__name__).warning(
                "could not remove placement group %s: %s", g.placement_group_id.hex(), exc
            )
    return removed


def _actor_gone(ray_state, actor_id: bytes) -> bool:
    """An actor id that is nil (the group was created by a driver), dead, or no longer in the actor table."""
    from ray import ActorID

    if not actor_id or ActorID(actor_id).is_nil():
        return True
    info = ray_state.actors(actor_id=actor_id.hex())
    return not info or info.get("State") == "DEAD"
