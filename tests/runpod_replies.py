"""A scripted RunPod for the adapter's `replier=`: each route answers from its own list of bodies
(the last one repeats), and every request is counted by route."""

from __future__ import annotations

from typing import Any

from podsettle.adapters.http import Answer, Request

RUN_ID = "job-1-u1"


class Script:
    """Answers each route from its own list (the last answer repeats) and records every request."""

    def __init__(self, **answers: list[Any]) -> None:
        self.answers = {route: list(items) for route, items in answers.items()}
        self.requests: list[tuple[str, str]] = []

    def __call__(self, request: Request) -> Answer:
        route = request.url.path.split("/")[3]
        self.requests.append((request.method, route))
        items = self.answers[route]
        body = items.pop(0) if len(items) > 1 else items[0]
        return body if isinstance(body, Answer) else Answer.of(200, json=body)

    def count(self, route: str) -> int:
        return sum(1 for _, seen in self.requests if seen == route)


def status(name: str, **fields: Any) -> dict[str, Any]:
    return {"id": RUN_ID, "status": name, **fields}


def stream(name: str, *parts: Any) -> dict[str, Any]:
    return {"status": name, "stream": [{"output": part} for part in parts]}
