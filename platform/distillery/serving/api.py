"""The HTTP API: request/response schemas and the FastAPI app, over any `Backend`.

The same app runs as the Ray Serve ingress (the backend calls the model deployment through its
handle) and as a bare uvicorn process (the backend is an in-process `service.Service`), which the
serve benchmark compares. Every malformed request is a 4xx naming the field; nothing a client sends
reaches the model unvalidated.
"""
from __future__ import annotations

import hmac
import os
from typing import Annotated, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationInfo, field_validator

from ..tasks import TASKS

API_KEY_ENV = "DISTILLERY_API_KEY"
MAX_HISTORY = 1000
MAX_CANDIDATES = 1000
MAX_K = 1000
MAX_TEXTS = 256
MAX_TEXT_CHARS = 1000
MAX_ID_CHARS = 256


ItemId = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_CHARS)]


class _Request(BaseModel):
    # A misspelt key ("histroy") is an error, not ignored. Lone UTF-16 surrogates ("\ud800") and
    # bytes that are not UTF-8 are refused by pydantic itself, naming the field.
    model_config = ConfigDict(extra="forbid")


class RecommendRequest(_Request):
    history: list[ItemId] = Field(max_length=MAX_HISTORY, description="item ids the user interacted with, oldest "
                                  "first; [] is a cold start (popular items)")
    k: int = Field(10, ge=1, le=MAX_K, description="how many items to return")
    exclude_history: bool = Field(True, description="leave out items already in the history")
    explain: bool = Field(False, description="also return the history items that weighed most")


class CtrRequest(_Request):
    history: list[ItemId] = Field(max_length=MAX_HISTORY, description="item ids the user interacted with, oldest first")
    candidates: list[ItemId] = Field(min_length=1, max_length=MAX_CANDIDATES, description="item ids to score")
    slots: list[Annotated[int, Field(ge=0, le=1000)]] | None = Field(
        None, description="display position of each candidate (0 = top); unknown when omitted")
    explain: bool = Field(False, description="also return the history items that weighed most")

    @field_validator("slots")
    @classmethod
    def _one_slot_per_candidate(cls, slots: list[int] | None, info: ValidationInfo):
        candidates = info.data.get("candidates")  # absent when the candidates were refused themselves
        if slots is not None and candidates is not None and len(slots) != len(candidates):
            raise ValueError(f"slots has {len(slots)} entries; it needs one per candidate ({len(candidates)})")
        return slots


class TextRequest(_Request):
    texts: list[Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS)]] = Field(
        min_length=1, max_length=MAX_TEXTS, description="shopping texts (queries, titles, reviews) to classify")
    explain: bool = Field(False, description="also return the words that weighed most for each label")


class WeightedItem(BaseModel):
    item_id: str
    title: str
    weight: float


class ScoredItem(BaseModel):
    item_id: str
    title: str
    score: float


class RecommendResponse(BaseModel):
    items: list[ScoredItem]
    cold_start: bool = Field(description="true when no history item is known: items are the most clicked, "
                                         "score is their click count")
    unknown_ids: list[str]
    explanation: list[WeightedItem] | None = None


class Probability(BaseModel):
    item_id: str
    probability: float


class CtrResponse(BaseModel):
    predictions: list[Probability] = Field(description="one per known candidate, in request order")
    cold_start: bool
    unknown_ids: list[str]
    explanation: list[WeightedItem] | None = None


class LabelProbability(BaseModel):
    label: str
    probability: float


class TokenWeight(BaseModel):
    token: str
    weight: float = Field(description="how much the label's probability falls when this word is removed")


class TextPrediction(BaseModel):
    label: str
    probability: float
    top: list[LabelProbability]
    explanation: list[TokenWeight] | None = None


class TextResponse(BaseModel):
    predictions: list[TextPrediction]


class Item(BaseModel):
    item_id: str
    title: str
    category: str


class ItemsResponse(BaseModel):
    total: int
    offset: int
    limit: int
    items: list[Item]


class Backend(Protocol):
    """What the routes call. Requests arrive validated, as plain dicts."""

    async def recommend(self, request: dict) -> dict: ...
    async def ctr(self, request: dict) -> dict: ...
    async def classify(self, task: str, request: dict) -> dict: ...
    async def items(self, limit: int, offset: int) -> dict: ...
    async def card(self) -> dict: ...


class BodyLimit:
    """ASGI middleware: 413 for a body over `max_bytes`, by its Content-Length or, for a chunked
    body, once the bytes read pass the limit."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._reject(send)
        seen, started, rejected = 0, False, False

        async def counted():
            # Over the limit: answer 413 now and tell the app the client left. (An exception here
            # would reach FastAPI's body parser, which turns every error into a 400.)
            nonlocal seen, rejected
            if rejected:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    rejected = True
                    if not started:
                        await self._reject(send)
                    return {"type": "http.disconnect"}
            return message

        async def tracked(message):
            nonlocal started
            if rejected:  # the app's own answer to the disconnect: the client has its 413
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except Exception:
            if not rejected:
                raise

    async def _reject(self, send):
        from starlette.responses import JSONResponse

        response = JSONResponse({"detail": f"request body over the {self.max_bytes}-byte limit"}, status_code=413)
        await response({"type": "http"}, None, send)


def _field(loc) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query")]
    return ".".join(parts) or "body"


def create_app(backend: Backend, *, max_body_bytes: int = 1 << 20, api_key: str | None = None):
    """The FastAPI app. `api_key` defaults to $DISTILLERY_API_KEY: when set, every /v1 route needs
    `Authorization: Bearer <key>`."""
    from fastapi import Depends, FastAPI, Header, HTTPException, Query
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    from .. import __version__

    api_key = (api_key if api_key is not None else os.environ.get(API_KEY_ENV)) or None  # "" = no key
    app = FastAPI(title="distillery", version=__version__,
                  description="Recommendation, CTR and text classes (intent, sentiment) from a distilled "
                              "multi-task student.")
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        # the input is not echoed back: it may be huge or not valid UTF-8
        errors = [{"field": _field(e.get("loc", ())), "message": e.get("msg", "invalid")} for e in exc.errors()]
        if any(e.get("type") == "json_invalid" for e in exc.errors()):
            return JSONResponse({"detail": "the body is not valid JSON", "errors": errors}, status_code=400)
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return JSONResponse({"detail": detail, "errors": errors}, status_code=422)

    async def authorized(authorization: str | None = Header(None, include_in_schema=False)) -> None:
        if api_key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise HTTPException(401, f"missing or wrong API key: send 'Authorization: Bearer <key>' "
                                     f"with the key in ${API_KEY_ENV}", headers={"WWW-Authenticate": "Bearer"})

    guarded = [Depends(authorized)]

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        card = await backend.card()
        return {"status": "ok", "model": card["version"]}

    @app.post("/v1/recommend", response_model=RecommendResponse, dependencies=guarded)
    async def recommend(request: RecommendRequest):
        return await backend.recommend(request.model_dump())

    @app.post("/v1/ctr", response_model=CtrResponse, dependencies=guarded)
    async def ctr(request: CtrRequest):
        return await backend.ctr(request.model_dump())

    served: list[str] = []  # the model's tasks, asked of the backend once

    async def model_tasks() -> list[str]:
        if not served:
            tasks = (await backend.card())["tasks"]
            if not served:  # another request may have filled it while this one awaited the card
                served.extend(tasks)
        return served

    def text_route(task: str):
        async def classify(request: TextRequest):
            if task not in await model_tasks():
                raise HTTPException(404, f"this model was not trained for {task}: it serves {', '.join(served)}")
            return await backend.classify(task, request.model_dump())
        return classify

    for task in (t for t in TASKS.values() if t.classifies):  # one endpoint per text classification task
        app.post(task.endpoint, response_model=TextResponse, dependencies=guarded, name=task.name,
                 summary=task.summary)(text_route(task.name))

    @app.get("/v1/items", response_model=ItemsResponse, dependencies=guarded)
    async def items(limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0, le=1 << 40)):
        return await backend.items(limit, offset)

    @app.get("/v1/model", dependencies=guarded)
    async def model() -> dict[str, Any]:
        return await backend.card()

    return app


class LocalBackend:
    """A `service.Service` in this process: the bare-uvicorn server and in-process tests."""

    def __init__(self, service):
        self.service = service

    async def recommend(self, request: dict) -> dict:
        return self.service.recommend([request])[0]

    async def ctr(self, request: dict) -> dict:
        return self.service.ctr([request])[0]

    async def classify(self, task: str, request: dict) -> dict:
        return self.service.classify(task, [request])[0]

    async def items(self, limit: int, offset: int) -> dict:
        return self.service.items(limit, offset)

    async def card(self) -> dict:
        return self.service.card
