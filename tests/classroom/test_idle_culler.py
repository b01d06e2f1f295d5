"""Idle culling in the course's JupyterHub: deploy/jupyterhub_config.py runs jupyterhub-idle-culler as a hub service,
and each student's server shuts down idle kernels (deploy/jupyter/jupyter_server_config.py).

Cheap: the config is loaded as JupyterHub loads it (traitlets' file loader), the
service's command line is parsed by the culler's own application class, and its
role is checked against the scopes the culler needs.  That the hub really starts
it and the culler may list the users is checked by tests/classroom/test_jupyterhub.py,
which keeps this service in its hub.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from traitlets.config.loader import PyFileConfigLoader

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "deploy" / "jupyterhub_config.py"
CULLER = "jupyterhub-idle-culler"
# What the culler calls on the hub (its README, "Permissions"), without --cull-users (which would delete accounts).
NEEDED_SCOPES = {"list:users", "read:users:activity", "read:servers", "delete:servers"}

pytestmark = pytest.mark.unit


def load(monkeypatch, **env: str):
    for name in ("LABKIT_HUB_IDLE_S", "LABKIT_HUB_CULL_EVERY_S", "LABKIT_KERNEL_IDLE_S"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return PyFileConfigLoader(CONFIG.name, str(CONFIG.parent)).load_config()


def culler_of(config):
    services = [service for service in config.JupyterHub.services if service["name"] == CULLER]
    assert len(services) == 1, f"{CONFIG.name} has no {CULLER} service: {config.JupyterHub.services}"
    return services[0]


def parsed(command: list[str]):
    """The culler's settings from ``command``, parsed by the culler's own application (a wrong flag fails)."""
    try:
        from jupyterhub_idle_culler import IdleCuller
    except ImportError:
        pytest.fail("jupyterhub-idle-culler is not installed: pip install -e '.[classroom]' (scripts/setup classroom)",
                    pytrace=False)

    assert command[:3] == [sys.executable, "-m", "jupyterhub_idle_culler"], command
    culler = IdleCuller()
    culler.parse_command_line(command[3:])
    return culler


def test_the_hub_runs_the_culler_with_an_hours_timeout_and_only_the_scopes_it_needs(monkeypatch):
    config = load(monkeypatch)
    service = culler_of(config)
    assert "api_token" not in service and "url" not in service, "a managed service: the hub makes its token"
    culler = parsed(service["command"])
    assert (culler.timeout, culler.cull_every) == (3600, 300)
    assert not culler.cull_users, "culling must stop servers, never delete student accounts"
    roles = [role for role in config.JupyterHub.load_roles if CULLER in role.get("services", [])]
    assert len(roles) == 1 and set(roles[0]["scopes"]) == NEEDED_SCOPES, roles
    assert not service.get("admin"), "the culler needs no admin rights"


def test_the_timeouts_come_from_the_environment_and_bad_ones_are_one_line(monkeypatch):
    culler = parsed(culler_of(load(monkeypatch, LABKIT_HUB_IDLE_S="900", LABKIT_HUB_CULL_EVERY_S="60"))["command"])
    assert (culler.timeout, culler.cull_every) == (900, 60)
    with pytest.raises(SystemExit, match="LABKIT_HUB_IDLE_S must be a whole number of seconds, not '15m'"):
        load(monkeypatch, LABKIT_HUB_IDLE_S="15m")


def test_the_culler_is_in_the_classroom_extra_and_installed():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(requirement.startswith("jupyterhub-idle-culler") for requirement in extras["classroom"])
    done = subprocess.run([sys.executable, "-m", "jupyterhub_idle_culler", "--help"], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ))
    assert done.returncode == 0 and "--timeout" in done.stdout, \
        f"jupyterhub_idle_culler does not run ({done.stderr[-300:]}): pip install -e '.[classroom]'"


def server_config(environment: dict[str, str]) -> subprocess.CompletedProcess:
    """What a student's Jupyter server loads with the hub's ``environment``, as ``jupyter server --show-config`` says."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("JUPYTER")} | environment
    return subprocess.run([str(Path(sys.executable).parent / "jupyter"), "server", "--show-config"],
                          capture_output=True, text=True, timeout=60, env=env)


def test_each_server_shuts_down_kernels_idle_for_half_an_hour_even_with_their_tab_open(monkeypatch):
    environment = load(monkeypatch).Spawner.environment
    assert environment["JUPYTER_CONFIG_PATH"] == str(REPO / "deploy" / "jupyter")
    shown = server_config(environment)
    assert shown.returncode == 0, shown.stderr[-500:]
    assert str(REPO / "deploy" / "jupyter" / "jupyter_server_config.py") in shown.stdout, shown.stdout
    settings = dict(line.strip().lstrip(".").split(" = ") for line in shown.stdout.splitlines()
                    if line.strip().startswith(".cull_"))
    assert settings == {"cull_idle_timeout": "1800", "cull_interval": "300", "cull_connected": "True",
                        "cull_busy": "False"}, shown.stdout

    environment = load(monkeypatch, LABKIT_KERNEL_IDLE_S="120").Spawner.environment
    monkeypatch.setenv("LABKIT_KERNEL_IDLE_S", environment["LABKIT_KERNEL_IDLE_S"])
    kernels = PyFileConfigLoader("jupyter_server_config.py", environment["JUPYTER_CONFIG_PATH"]).load_config()
    assert (kernels.MappingKernelManager.cull_idle_timeout, kernels.MappingKernelManager.cull_interval) == (120, 120)
    with pytest.raises(SystemExit, match="LABKIT_KERNEL_IDLE_S must be a whole number of seconds, not '0'"):
        load(monkeypatch, LABKIT_KERNEL_IDLE_S="0")
