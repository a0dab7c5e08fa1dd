"""The operators' surface: the HTTP listener, the admin API, the console.

`app` is the listener (`/metrics`, `/healthz`, `/readyz`, the API and the
console's files), `api` the routes under `/api/v1`, `openapi` the routes as
data and their OpenAPI document, `operations` what the CLI and the API both
do, once. `console/` is the web console (static files).

May import: the core, `relay.store` and `relay.channels`; never `relay.smtp`
(tests/test_layers.py).
"""
