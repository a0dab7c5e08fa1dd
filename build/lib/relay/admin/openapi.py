"""The admin API's routes as data: each route's method, path, parameters and body schema.

One table (`relay.admin.routes.ENDPOINTS`) is both what the API serves and what its
OpenAPI document (`/api/v1/openapi.json`) says, so they cannot disagree. The
same schemas check the requests: `check_body` and `check_query` accept what
the document promises and nothing else (unknown fields are refused, so a typo
is an error, never a silent no-op). Pure: no I/O, tested without a server.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from relay.errors import Invalid

VERSION = "1"
PREFIX = "/api/v1"
# The errors every authenticated route may answer, besides its own.
COMMON_ERRORS = {
    "401": "no admin token, or not a valid one (`unauthorized`)",
    "413": "the body is larger than the cap (`body_too_large`)",
    "429": "too many failed attempts from this address (`throttled`)",
    "503": "the store did not answer (`store_unavailable`)",
}
_PARAM = re.compile(r"{(\w+)(?::\w+)?}")
_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
}


@dataclass(frozen=True, slots=True)
class Param:
    """A query parameter: `kind` is `string` or `integer`."""

    name: str
    description: str
    kind: str = "string"
    enum: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Field:
    """A field of a JSON request body."""

    name: str
    kind: str  # string, integer, number, boolean, array (of strings)
    description: str
    required: bool = False
    max_length: int | None = None  # characters; entries of an array

    def schema(self) -> dict[str, Any]:
        value: dict[str, Any] = {"type": self.kind, "description": self.description}
        if self.kind == "array":
            value["items"] = {"type": "string"}
        if self.max_length:
            value["maxItems" if self.kind == "array" else "maxLength"] = self.max_length
        return value


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str  # Starlette syntax: `{name}`, `{message_id:path}`
    summary: str
    handler: Callable[..., Awaitable[Any]]
    status: int = 200
    query: tuple[Param, ...] = ()
    body: tuple[Field, ...] | None = None  # None: the route takes no body
    errors: Mapping[str, str] = field(default_factory=dict)  # status -> why
    returns: str = "success"  # what the success answer holds

    @property
    def openapi_path(self) -> str:
        return _PARAM.sub(r"{\1}", self.path)

    @property
    def path_params(self) -> list[str]:
        return _PARAM.findall(self.path)


def check_body(endpoint: Endpoint, raw: bytes) -> dict[str, Any]:
    """The parsed body, or `Invalid` (bad JSON is `bad_json`, anything else `bad_body`)."""
    if endpoint.body is None:
        return {}
    try:
        value = json.loads(raw) if raw.strip() else None
    except (ValueError, RecursionError):
        raise Invalid("the body is not valid JSON", code="bad_json") from None
    if not isinstance(value, dict):
        raise Invalid("the body must be a JSON object", code="bad_body")
    fields = {f.name: f for f in endpoint.body}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise Invalid(f"unknown field(s): {', '.join(unknown)}", code="bad_body")
    for f in endpoint.body:
        if f.name not in value:
            if f.required:
                raise Invalid(f"{f.name}: required", code="bad_body")
            continue
        v = value[f.name]
        if v is None and not f.required:
            continue
        if not _TYPES[f.kind](v):
            expected = "a list of strings" if f.kind == "array" else f.kind
            raise Invalid(f"{f.name}: expected {expected}", code="bad_body")
        if f.max_length is not None and len(v) > f.max_length:
            unit = "entries" if f.kind == "array" else "characters"
            raise Invalid(f"{f.name}: at most {f.max_length} {unit}", code="bad_body")
    return {k: v for k, v in value.items() if v is not None}


def check_query(endpoint: Endpoint, query: Mapping[str, str]) -> dict[str, str | int]:
    params = {p.name: p for p in endpoint.query}
    unknown = sorted(set(query) - set(params))
    if unknown:
        raise Invalid(f"unknown query parameter(s): {', '.join(unknown)}", code="bad_query")
    out: dict[str, str | int] = {}
    for name, text in query.items():
        param = params[name]
        if text == "":
            continue
        if param.enum and text not in param.enum:
            raise Invalid(f"{name}: one of {', '.join(param.enum)}", code="bad_query")
        if param.kind == "integer":
            if not re.fullmatch(r"-?\d{1,18}", text):
                raise Invalid(f"{name}: expected a whole number", code="bad_query")
            out[name] = int(text)
        else:
            out[name] = text
    return out


def _error_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
            }
        },
    }


def document(endpoints: list[Endpoint], public: list[tuple[str, str, str]]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `endpoints` (authenticated) and `public` (method, path,
    summary: routes that take no token)."""
    paths: dict[str, dict[str, Any]] = {}
    for ep in endpoints:
        operation: dict[str, Any] = {
            "summary": ep.summary,
            "operationId": f"{ep.method.lower()}_{re.sub(r'[^a-z0-9]+', '_', ep.openapi_path)}",
            "security": [{"bearer": []}],
            "parameters": [
                {"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                for n in ep.path_params
            ]
            + [
                {
                    "name": p.name,
                    "in": "query",
                    "required": False,
                    "description": p.description,
                    "schema": {"type": p.kind, **({"enum": list(p.enum)} if p.enum else {})},
                }
                for p in ep.query
            ],
            "responses": {
                str(ep.status): {
                    "description": ep.returns,
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                **{
                    status: {
                        "description": why,
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
                        },
                    }
                    for status, why in {**COMMON_ERRORS, **ep.errors}.items()
                },
            },
        }
        if ep.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": [f.name for f in ep.body if f.required],
                            "properties": {f.name: f.schema() for f in ep.body},
                        }
                    }
                },
            }
        paths.setdefault(ep.openapi_path, {})[ep.method.lower()] = operation
    for method, path, summary in public:
        paths.setdefault(path, {})[method.lower()] = {
            "summary": summary,
            "security": [],
            "responses": {"200": {"description": "success"}},
        }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "relay admin API",
            "version": VERSION,
            "description": "Everything the `relay` CLI does, as JSON over HTTP. Errors are"
            ' `{"error": {"code", "message"}}`. Authenticate with `Authorization: Bearer'
            " <admin token>` (`relay admin-token create`).",
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": _error_schema()},
        },
        "paths": paths,
    }
