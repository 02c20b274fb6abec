"""Model-worker SDK: run a head of a model that serves the jobs the router sends it."""

from consumers.worker import Handler, JobContext, JobRefused, ModelWorker, WorkerConfig

__all__ = ["Handler", "JobContext", "JobRefused", "ModelWorker", "WorkerConfig"]
