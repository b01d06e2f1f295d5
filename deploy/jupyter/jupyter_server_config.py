# Each student's Jupyter server: idle kernels are shut down.
#
# A notebook's kernel holds about 100 MB (Python, labkit, matplotlib, and an emulator worker per live Machine)
# for as long as it lives, running or not: a student who opens every notebook in its own tab and closes none
# passes the 1.5 GB a student is given (deploy/README.md).  The server shuts down a kernel that has run
# nothing and printed nothing for LABKIT_KERNEL_IDLE_S seconds (default 30 minutes), also when its tab is
# still open (cull_connected), but never one that is running a cell (cull_busy stays off).  Its VMs end with
# it; the notebook file is untouched and JupyterLab offers to start a new kernel, where the notebook runs
# again from the top in well under a minute.
#
# The hub in deploy/jupyterhub_config.py puts this folder on each server's JUPYTER_CONFIG_PATH; the
# Kubernetes image copies this file to /etc/jupyter (deploy/kubernetes/Dockerfile).
import os

c = get_config()  # noqa: F821 (provided by the Jupyter server when it loads this file)

text = os.environ.get("LABKIT_KERNEL_IDLE_S", "1800")
if not text.isdigit() or int(text) == 0:
    raise SystemExit(f"jupyter_server_config.py: LABKIT_KERNEL_IDLE_S must be a whole number of seconds, not {text!r}")
c.MappingKernelManager.cull_idle_timeout = int(text)
c.MappingKernelManager.cull_interval = min(300, int(text))
c.MappingKernelManager.cull_connected = True
c.MappingKernelManager.cull_busy = False
