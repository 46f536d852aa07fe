"""`podsettle onboard`: register an agent with Purple Flea and claim the faucet (the contract's
onboarding routes; the sandbox serves them too)."""

from __future__ import annotations

from typing import Any

import httpx
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from podsettle.adapters.ports import BadResponse, Rejected, Unavailable


class Registration(BaseModel):
    model_config = ConfigDict(extra="ignore")

    agent_id: str = Field(
        validation_alias=AliasChoices("agent_id", "id", "agentId"), pattern=r"^ag_[A-Za-z0-9_]+$"
    )
    api_key: str = Field(validation_alias=AliasChoices("api_key", "key", "apiKey"), min_length=8)

    def __repr__(self) -> str:
        return f"Registration(agent_id={self.agent_id!r}, api_key='***')"


async def _post(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, Any]:
    try:
        response = await client.post(url, json=body)
    except httpx.HTTPError as error:
        raise Unavailable(f"cannot reach {url}: {type(error).__name__}") from None
    try:
        data = response.json()
    except ValueError:
        raise BadResponse(f"{url} answered {response.status_code} without JSON") from None
    if response.status_code >= 400:
        code = data.get("error") if isinstance(data, dict) else None
        message = data.get("message") if isinstance(data, dict) else None
        raise Rejected(
            f"{url} refused: {code or response.status_code}: {message or ''}".rstrip(": "),
            status_code=response.status_code,
            code=code,
        )
    if not isinstance(data, dict):
        raise BadResponse(f"{url} answered with JSON that is not an object")
    return data


async def onboard(casino_url: str, faucet_url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(15.0)) as client:
        data = await _post(client, f"{casino_url.rstrip('/')}/api/v1/auth/register", {})
        try:
            agent = Registration.model_validate(data)
        except ValidationError as error:
            fields = ", ".join(str(e["loc"][0]) for e in error.errors())
            raise BadResponse(f"the registration answer lacks a valid {fields}") from None
        try:
            claim = await _post(
                client, f"{faucet_url.rstrip('/')}/faucet/claim", {"agent_casino_id": agent.agent_id}
            )
            faucet = (
                claim.get("message") or f"claimed {claim.get('amount', claim.get('amount_usd', '?'))} USDC"
            )
            claimed = True
        except Rejected as error:  # the agent exists: the caller shows its key, then exits non-zero
            faucet = f"not claimed: {error}"
            claimed = False
    return {"agent_id": agent.agent_id, "api_key": agent.api_key, "faucet": faucet, "claimed": claimed}
