"""The wire protocol shared by the services (gateway, workers) and the operator: what one side writes and the other
reads. Nothing here imports the rest of dsv4, and `dsv4.protocol.env` imports nothing at all, so every layer may use
it (see docs/architecture.md).

- `env`: every `DSV4_*` environment variable, named once;
- `contract`: roles, ports, HTTP paths, mounted files and metric names of the container contract;
- `keys`: every Redis key and stream name;
- `config`: the settings the operator writes into a role's ConfigMap and the role reads (one model, one set of limits);
- `connection`: Redis clients with the timeouts every side uses, and `RedisUnavailable`;
- `stats`: the work queues' autoscaling signal (`queue_stats`).
"""
