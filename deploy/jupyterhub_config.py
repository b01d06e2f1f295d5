# JupyterHub for a class on one machine: each student gets JupyterLab with labkit, in their own processes.
#
#   scripts/setup classroom          # labkit[classroom] (jupyterhub) and configurable-http-proxy (npm)
#   .venv/bin/jupyterhub -f deploy/jupyterhub_config.py
#
# Students log in with their Unix accounts (PAM) and their servers run as those users
# (LocalProcessSpawner), so one student's files, kernels and VMs are not another's.  Each
# student account must be in the group that owns /dev/kvm (`usermod -aG kvm NAME`), or labkit
# falls back to the emulator, and say so in notebook 00.  See deploy/README.md.
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

c = get_config()  # noqa: F821 (provided by JupyterHub when it loads this file)

c.JupyterHub.bind_url = os.environ.get("LABKIT_HUB_URL", "http://127.0.0.1:8000")
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.db_url = os.environ.get("LABKIT_HUB_DB", "sqlite:///jupyterhub.sqlite")
c.JupyterHub.cookie_secret_file = os.environ.get("LABKIT_HUB_COOKIE_SECRET", "jupyterhub_cookie_secret")
c.ConfigurableHTTPProxy.command = [str(VENV_BIN / "configurable-http-proxy")]

c.JupyterHub.authenticator_class = "pam"
c.JupyterHub.spawner_class = "localprocess"
c.Spawner.cmd = [str(VENV_BIN / "jupyterhub-singleuser")]
c.Spawner.default_url = "/lab/tree/00-welcome.ipynb"
c.Spawner.notebook_dir = "~/labkit-notebooks"
c.Spawner.env_keep = ["PATH", "LANG", "LC_ALL", "LABKIT_BACKEND"]
# A student's server with its kernels and their labkit worker processes: the Binder test
# measures all six notebooks' kernels at once under 1 GB; the JupyterHub test prints one
# server with notebook 00 (deploy/README.md).  Enforced by a spawner that can (systemd,
# Kubernetes); LocalProcessSpawner only passes it to the server as MEM_LIMIT.
c.Spawner.mem_limit = "1536M"
c.Spawner.start_timeout = 120
c.Spawner.http_timeout = 120

# Idle servers: jupyterhub-idle-culler (in labkit[classroom]) runs as a service the hub starts and stops with
# itself.  It stops a student's server (its kernels, their VMs and emulator workers) after LABKIT_HUB_IDLE_S
# seconds without activity (default an hour: a lab session's pause, not a lunch break), checking every
# LABKIT_HUB_CULL_EVERY_S seconds; the student's files stay, the next login starts a fresh server.  Every
# message from a kernel (a cell's output) counts as activity.  Its role has only the scopes the culler's
# documentation lists (no admin).
IDLE_CULLER = "jupyterhub-idle-culler"


def seconds_from(variable: str, default: int) -> int:
    text = os.environ.get(variable, str(default))
    if not text.isdigit() or int(text) == 0:
        raise SystemExit(f"deploy/jupyterhub_config.py: {variable} must be a whole number of seconds, not {text!r}")
    return int(text)


# Idle kernels inside a student's server: deploy/jupyter/jupyter_server_config.py shuts down a kernel that
# has done nothing for LABKIT_KERNEL_IDLE_S seconds (default 30 minutes), tab open or not.
c.Spawner.environment = {
    "JUPYTER_CONFIG_PATH": str(REPO / "deploy" / "jupyter"),
    "LABKIT_KERNEL_IDLE_S": str(seconds_from("LABKIT_KERNEL_IDLE_S", 1800)),
}

c.JupyterHub.services = [{
    "name": IDLE_CULLER,
    "command": [sys.executable, "-m", "jupyterhub_idle_culler",
                f"--timeout={seconds_from('LABKIT_HUB_IDLE_S', 3600)}",
                f"--cull-every={seconds_from('LABKIT_HUB_CULL_EVERY_S', 300)}"],
}]
c.JupyterHub.load_roles = [{
    "name": IDLE_CULLER,
    "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"],
    "services": [IDLE_CULLER],
}]
