"""GET /v1/models and GET /v1/models/{model}: the one served model, with its context length."""

from __future__ import annotations

from fastapi import APIRouter

from engine import AsyncEngine
from server.protocol import ModelCard, ModelList
from server.routes import ERROR_RESPONSES
from server.state import EngineDep, ServerState, StateDep

router = APIRouter(tags=["openai"])


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def list_models(state: StateDep, engine: EngineDep) -> ModelList:
    assert state.served_model_name is not None
    return ModelList(data=[_card(state.served_model_name, state, engine)])


# `:path` because hub-style names hold a slash ("Qwen/Qwen2.5-0.5B"), which the SDK sends as is
@router.get("/v1/models/{model:path}", response_model=ModelCard, responses=ERROR_RESPONSES)
async def retrieve_model(model: str, state: StateDep, engine: EngineDep) -> ModelCard:
    """The card /v1/models lists, for any name a request may send; 404 (model_not_found) for
    any other, decided by the same check generation uses so the two never disagree."""
    return _card(state.model_name_for(model), state, engine)


def _card(name: str, state: ServerState, engine: AsyncEngine) -> ModelCard:
    return ModelCard(id=name, created=state.created, root=engine.model_name,
                     max_model_len=engine.max_model_len)
