"""The KServe adapter: serves the model bundle over v1, v2 REST and gRPC."""
