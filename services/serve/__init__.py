"""`dsv4 serve`: the gateway, one prefill and one decode worker, and their Redis, on this machine.

The roles run as the same `dsv4 gateway|prefill|decode` processes a Kubernetes deployment runs (docs/serving.md says
why processes); this process supervises them. `command.py` is the command's flow (check, start, wait until ready,
print how to call it, supervise, stop); `preflight.py` the checks made before anything starts and the embedded
model; `brokers.py` the Redis the roles share (a private `redis-server` restarted when it dies, the in-process
broker, or the `--redis-url` one); `supervisor.py` the role processes, their readiness, signals and the stop order.
"""

from dsv4.services.serve.command import run

__all__ = ["run"]
