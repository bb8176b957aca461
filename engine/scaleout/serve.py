"""Ray Serve replicas of the HTTP server: one loaded model per replica, behind one endpoint.

Each replica loads a ``Service`` and serves ``create_app(service, config)``, the
app of ``rerank-engine serve``, through Serve's FastAPI ingress: the app is
built inside the replica, after the model has loaded (``__serve_build_asgi_app__``),
so the routes, shapes and errors are those of the plain server.

Backpressure: Ray admits up to ``2 * max_queue`` requests to a replica, so the
replica's own admission (``--max-queue``) answers the excess with 429 and
``Retry-After`` at once, instead of Ray queueing them without bound. Ray's router
sends each request to the less loaded of two replicas, so a 429 means the
replicas it looked at were full. A rejection frees its slot at once, so the
router's own queue stays short and clients see 429, not a wait.

Autoscaling is Ray's own ``autoscaling_config`` over the ongoing requests per
replica (the queue depth): between ``replicas`` and ``max_replicas``, aiming at
``target_queue`` per replica.
"""
import logging
import signal
import threading
from dataclasses import dataclass
from typing import Optional

from engine.config import EngineConfig
from engine.scaleout.local import init, require_ray, scrub_env
from engine.serving.server import ServerConfig

log = logging.getLogger("engine.scaleout.serve")
APP_NAME = "rerank-engine"


@dataclass
class ReplicaSpec:
    """What every replica loads and serves (pickled to the replicas)."""
    engine: EngineConfig  # the model (None: the bundled all-MiniLM-L6-v2) and every engine option
    server: ServerConfig
    threads: Optional[int] = None  # torch threads on CPU (default: the replica's num_cpus)


def deployment_options(replicas: int, max_queue: int, max_replicas: Optional[int] = None,
                       target_queue: Optional[float] = None, gpus: bool = False, cpus: float = 1) -> dict:
    """Serve deployment options: one replica per GPU (``gpus``) or per ``cpus`` cores, and the queue limits."""
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, got {replicas}")
    if max_replicas is not None and max_replicas < replicas:
        raise ValueError(f"max_replicas ({max_replicas}) is less than replicas ({replicas})")
    actor = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": cpus}
    opts = {"ray_actor_options": actor, "max_ongoing_requests": 2 * max_queue,
            "health_check_period_s": 2, "health_check_timeout_s": 30, "graceful_shutdown_timeout_s": 10}
    if max_replicas is not None and max_replicas > replicas:
        opts["autoscaling_config"] = {"min_replicas": replicas, "initial_replicas": replicas,
                                      "max_replicas": max_replicas,
                                      "target_ongoing_requests": target_queue or max(1.0, max_queue / 4)}
    else:
        opts["num_replicas"] = replicas
    return opts


def build_app(spec: ReplicaSpec, options: dict):
    """The Serve application: ``options`` (``deployment_options``) over replicas loading ``spec``."""
    require_ray()
    from ray import serve

    @serve.deployment(name="engine", **options)
    @serve.ingress()
    class EngineReplica:
        def __init__(self, spec: ReplicaSpec):
            scrub_env()
            import ray
            import torch

            from engine.serving.service import Service

            cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1) or 1)
            if not torch.cuda.is_available():
                torch.set_num_threads(spec.threads or max(1, cpus))
            self.spec = spec
            self.service = Service(config=spec.engine, warmup=True)

        def __serve_build_asgi_app__(self):
            from engine.serving.server import create_app

            return create_app(self.service, self.spec.server)

    return EngineReplica.bind(spec)


def deploy(spec: ReplicaSpec, options: dict, host: str = "127.0.0.1", port: int = 8000,
           address: Optional[str] = None):
    """Start Serve's HTTP proxy on ``host:port`` (on the head node) and deploy; returns once replicas are up."""
    init(address)
    from ray import serve

    serve.start(proxy_location="HeadOnly", http_options={"host": host, "port": port})
    serve.run(build_app(spec, options), name=APP_NAME, route_prefix="/", blocking=False)
    return serve


def shutdown() -> None:
    """Delete the application and stop Serve (the Ray instance itself is the caller's)."""
    from ray import serve

    serve.shutdown()


def run(spec: ReplicaSpec, options: dict, host: str, port: int, address: Optional[str] = None) -> int:
    """``rerank-engine serve --replicas N``: deploy, serve until SIGINT/SIGTERM, then shut down."""
    n = options.get("num_replicas") or options["autoscaling_config"]["min_replicas"]
    init(address)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after Ray's own handlers (ray.init), before deploying
        signal.signal(sig, lambda signum, frame: stop.set())
    deploy(spec, options, host, port, address)
    log.info("serving on http://%s:%d with %s replica(s) on Ray", host, port,
             n if "num_replicas" in options else f"{n}-{options['autoscaling_config']['max_replicas']}")
    stop.wait()
    log.info("shutting down the replicas")
    shutdown()
    import ray

    ray.shutdown()
    return 0
