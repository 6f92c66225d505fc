"""Deterministic ids for messages, tasks and executions.

Re-sending after a crash must be idempotent, so every id the runtime writes is derived from
where it comes from (instance, execution, step), never from a random source.
"""

from __future__ import annotations

import uuid

_NAMESPACE = uuid.UUID("3f9d1c2a-7e41-4b8a-9d0e-5c6b7a8f9e10")


def message_id(instance_id: str, execution_id: str, kind: str, step: int) -> str:
    return f"{instance_id}|{execution_id}|{kind}|{step}"


def activity_task_id(instance_id: str, execution_id: str, task_id: int) -> str:
    return f"{instance_id}|{execution_id}|activity|{task_id}"


def child_execution_id(parent_id: str, parent_execution_id: str, task_id: int) -> str:
    return uuid.uuid5(_NAMESPACE, f"child|{parent_id}|{parent_execution_id}|{task_id}").hex


def next_execution_id(instance_id: str, execution_id: str) -> str:
    return uuid.uuid5(_NAMESPACE, f"next|{instance_id}|{execution_id}").hex
