"""router-worker: routes model-inference jobs from Kafka to model replicas (heads) tracked in Redis."""

__version__ = "0.1.0"
