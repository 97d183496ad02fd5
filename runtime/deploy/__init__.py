"""Scale-out on Ray Serve (``unimp serve --engine ray``; the optional ``ray`` extra).

- ``ingress``: the unimp.v1 services as Serve's gRPC proxy registers them (raw-bytes requests);
- ``replica``: a Serve replica hosting the same ``runtime.server.servicer.Servicer`` as ``unimp serve``;
- ``store``: the single-writer interaction store / catalog journal deployment the replicas share;
- ``routing`` / ``router``: user-affinity routing with a load bound (a ``ray.serve.request_router``);
- ``app``: the application, its Serve-config builder, and the local cluster the CLI runs.

Only ``app``, ``replica`` and ``router`` import ray, and only when used.
"""
