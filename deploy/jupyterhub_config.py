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
# Idle servers: stopped by jupyterhub-idle-culler where installed (Binder does the same).
