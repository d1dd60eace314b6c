"""The running system: faust app, pipeline, Kafka and Redis adapters, CLI."""
