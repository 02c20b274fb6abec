"""Producer SDK: publish jobs to router-worker's request topic."""

from producers.producer import JobProducer, SyncJobProducer, build_job

__all__ = ["JobProducer", "SyncJobProducer", "build_job"]
