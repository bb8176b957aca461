"""The HTTP layer: the Service over one engine, the FastAPI app and its routes, request and response
bodies, the API-key and body-limit middleware, Prometheus metrics."""
