"""The input a job was submitted with, kept so that a restarted engine can submit it again.

It is its own aggregate, saved atomically with the job it belongs to: the job's events stay small
(they carry the input's digest), and the input is read only when RunPod has to be asked again.
"""

from __future__ import annotations

import uuid
from typing import Any

from eventsourcing.domain import Aggregate, event

INPUT_NAMESPACE = uuid.UUID("0b7e3c52-4d8f-4a51-9b3e-6a2d5c8f1e47")


def input_id_for(job_key: str) -> uuid.UUID:
    return uuid.uuid5(INPUT_NAMESPACE, job_key)


class JobInput(Aggregate):
    class Recorded(Aggregate.Created):
        class_version = 1
        job_key: str
        digest: str
        payload: dict[str, Any]

    @staticmethod
    def create_id(job_key: str) -> uuid.UUID:
        return input_id_for(job_key)

    @event(Recorded)
    def __init__(self, job_key: str, digest: str, payload: dict[str, Any]) -> None:
        self.job_key = job_key
        self.digest = digest
        self.payload = payload
