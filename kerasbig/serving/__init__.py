"""The dev server behind `python -m kerasbig.serve`: TF Serving's REST and gRPC APIs over one model repository.

- `errors`: ServingError, a refusal with TF Serving's status code (shown as HTTP or gRPC status).
- `json_tensor`: TF Serving's JSON <-> tensor rules (util/json_tensor.cc), with limits on what a body expands into.
- `repository`: the models and versions on disk, loaded by a poller, with each version's load result.
- `rest`: an asyncio HTTP front end (read timeouts, a bounded worker pool, 503 when full).
- `grpc_api`: TF Serving's PredictionService and ModelService.
- `bench`: `python -m kerasbig.serving.bench`, REST and gRPC speed and a bounded attack (docs/benchmark.md).
"""
