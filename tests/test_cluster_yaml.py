"""cluster.yaml: valid for Ray's own launcher schema, and the deployment invariants hold (not just parsed)."""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
# Instance families the config may use for GPU workers, and the GPU each carries.
GPU_FAMILIES = {
    "g5": "A10G", "g6": "L4", "g6e": "L40S", "p4d": "A100", "p4de": "A100", "p5": "H100", "p5e": "H200",
}
CPU_FAMILIES = ("m6i", "m7i", "m6a", "m7a", "c6i", "c7i", "r6i", "r7i", "m5", "c5", "r5")


def _raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _prepared(cfg: dict | None = None) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg if cfg is not None else _raw()))
    validate_config(prepared)
    return prepared


def _family(instance_type: str) -> str:
    return instance_type.split(".")[0]


def _ray_start_args(command: str) -> list[str]:
    """The arguments of the `ray start` in a shell command (up to the next ; or &&)."""
    m = re.search(r"\bray start\b(.*?)(?:;|&&|$)", command, flags=re.S)
    assert m, f"no 'ray start' in {command!r}"
    return shlex.split(m.group(1))


def test_validates_with_ray_schema():
    cfg = _prepared()
    assert cfg["provider"]["type"] == "aws"
    assert cfg["head_node_type"] in cfg["available_node_types"]


def test_schema_check_is_live():
    """The same validator rejects a config with an unknown key or a wrong type, so the test above can fail."""
    import jsonschema

    bad = _raw()
    bad["available_node_types"]["head"]["bogus_key"] = 1
    with pytest.raises(jsonschema.ValidationError, match="bogus_key"):
        _prepared(bad)
    bad = _raw()
    bad["max_workers"] = "many"
    with pytest.raises(jsonschema.ValidationError):
        _prepared(bad)


def test_head_is_cpu_only_and_workers_are_autoscaling_gpus():
    cfg = _prepared()
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert _family(head["node_config"]["InstanceType"]).startswith(CPU_FAMILIES)
    assert head["max_workers"] == 0
    assert head["resources"].get("CPU") == 0, "the head must not take training / rendering work"
    assert "InstanceMarketOptions" not in head["node_config"], "the head must not be a spot instance"
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert len(workers) >= 2
    for name, node_type in workers.items():
        family = _family(node_type["node_config"]["InstanceType"])
        assert family in GPU_FAMILIES, f"{name}: {family} is not a GPU instance family"
        assert node_type["min_workers"] == 0, f"{name} must scale from zero"
        assert 1 <= node_type["max_workers"] <= cfg["max_workers"]
    gpus = {GPU_FAMILIES[_family(t["node_config"]["InstanceType"])] for t in workers.values()}
    assert len(gpus) >= 2, "offer a small and a large GPU type"
    text = CLUSTER_YAML.read_text()
    for node_type in workers.values():  # every instance type is explained in the header
        assert node_type["node_config"]["InstanceType"] in text.split("cluster_name:")[0]


def test_project_installed_on_every_node():
    raw = _raw()
    mounts = raw["file_mounts"]
    project_remote = [remote for remote, local in mounts.items() if local == "."]
    assert project_remote, "the repository must be synced to the nodes"
    assert (REPO / "pyproject.toml").exists()
    cfg = _prepared()
    for key in ("head_setup_commands", "worker_setup_commands"):  # setup_commands merged into both
        joined = "\n".join(cfg[key])
        assert re.search(r"pip install .*torch", joined), f"{key}: torch is not installed"
        assert re.search(rf"pip install .*-e {re.escape(project_remote[0])}\b", joined), f"{key}: no project"
        assert "/mnt/shared" in joined and "mount -t nfs4" in joined, f"{key}: shared storage not mounted"
    assert ".venv" in raw["rsync_exclude"]


def test_token_auth_explicit_and_dashboard_local_only():
    raw = _raw()
    token_remote = [r for r, local in raw["file_mounts"].items() if local.endswith(".ray/auth_token")]
    assert len(token_remote) == 1, "the local token must be copied to the nodes"
    token_name = token_remote[0].replace("~/", "")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in raw[key] if "ray start" in c]
        assert len(starts) == 1, key
        cmd = starts[0]
        before = cmd.split("ray start")[0]
        assert "export RAY_AUTH_MODE=token" in before, f"{key}: RAY_AUTH_MODE=token not set before ray start"
        assert f"RAY_AUTH_TOKEN_PATH=$HOME/{token_name}" in before, f"{key}: token path not set explicitly"
        assert "MLFLOW_TRACKING_URI=http://" in before, f"{key}: nodes must log to the MLflow server"
    head = next(c for c in raw["head_start_ray_commands"] if "ray start" in c)
    args = _ray_start_args(head)
    assert "--head" in args and "--dashboard-host=127.0.0.1" in args
    assert "0.0.0.0" not in " ".join(args)
    worker = next(c for c in raw["worker_start_ray_commands"] if "ray start" in c)
    assert "--address=$RAY_HEAD_IP:6379" in _ray_start_args(worker)


def test_ray_start_flags_parse_with_ray_cli():
    """Every `ray start` line uses options that Ray 2.60's own CLI accepts (click parse, nothing started)."""
    import click
    from ray.scripts.scripts import start

    raw = _raw()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for cmd in raw[key]:
            if "ray start" in cmd:
                start.make_context("start", _ray_start_args(cmd))
    with pytest.raises(click.UsageError):
        start.make_context("start", ["--dashboard-hots=127.0.0.1"])


def _mlflow_server_args(command: str) -> list[str]:
    """The arguments of the `mlflow server` in a shell command (up to the output redirection)."""
    m = re.search(r"\bmlflow server\b(.*?)(?:>|;|&&|$)", command, flags=re.S)
    assert m, f"no 'mlflow server' in {command!r}"
    return shlex.split(m.group(1))


def test_mlflow_server_on_head_with_shared_artifacts():
    raw = _raw()
    server = next(c for c in raw["head_start_ray_commands"] if "mlflow server" in c)
    assert re.search(r"--backend-store-uri sqlite:////\S+", server)
    assert re.search(r"--artifacts-destination /mnt/shared/\S+", server)
    assert "--port 5000" in server


def test_mlflow_server_private_address_and_password():
    """Not 0.0.0.0 without auth: the head's private address, MLflow's basic-auth app with the cluster secret
    as the admin password, and every node logging with those credentials. Parsed by MLflow's own CLI."""
    from mlflow.cli import server as mlflow_server

    raw = _raw()
    token_remote = next(r for r, local in raw["file_mounts"].items() if local.endswith(".ray/auth_token"))
    command = next(c for c in raw["head_start_ray_commands"] if "mlflow server" in c)
    params = mlflow_server.make_context("server", _mlflow_server_args(command)).params
    assert params["host"] in ("127.0.0.1", "$HEAD_IP"), f"MLflow server host {params['host']!r}"
    if params["host"] == "$HEAD_IP":  # the private address, which only cluster nodes reach
        assert "HEAD_IP=$(hostname -I | awk '{print $1}');" in command
    assert params["app_name"] == "basic-auth", "the MLflow server must ask for a password"
    env = command.split("mlflow server")[0]
    assert f'MLFLOW_AUTH_ADMIN_PASSWORD="$(cat {token_remote})"' in env
    assert "MLFLOW_FLASK_SERVER_SECRET_KEY=" in env  # the auth app refuses to start without one
    assert any(re.search(r"pip install .*mlflow\[auth\]", c) for c in raw["head_setup_commands"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in raw[key] if "ray start" in c).split("ray start")[0]
        assert "MLFLOW_TRACKING_USERNAME=admin" in start, key
        assert f'MLFLOW_TRACKING_PASSWORD="$(cat {token_remote})"' in start, key
    with pytest.raises(Exception, match="basic-authx"):  # the CLI check is live
        mlflow_server.make_context("server", ["--app-name", "basic-authx"])


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_every_command_is_valid_shell():
    cfg = _prepared()
    keys = ("initialization_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    for key in keys:
        for cmd in cfg[key]:
            res = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
            assert res.returncode == 0, f"{key}: {cmd!r}: {res.stderr}"
