"""GET /v1/models: the one served model, with its context length."""

from __future__ import annotations

from fastapi import APIRouter

from server.protocol import ModelCard, ModelList
from server.routes import ERROR_RESPONSES
from server.state import EngineDep, StateDep

router = APIRouter(tags=["openai"])


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def list_models(state: StateDep, engine: EngineDep) -> ModelList:
    assert state.served_model_name is not None
    card = ModelCard(id=state.served_model_name, created=state.created,
                     root=engine.model_name, max_model_len=engine.max_model_len)
    return ModelList(data=[card])
