# The relay as a user runs it in production: `docker compose up` (see docker-compose.yml).
FROM python:3.12-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY relay ./relay
RUN pip install --no-cache-dir ".[postgres]" && useradd --system --uid 10465 relay \
    && mkdir -p /data /certs && chown relay /data /certs
USER relay
# /certs owned by the relay: a named volume mounted there starts with this
# owner, so the compose files' `certs` service can write the key into it.
# Uploads in progress wait in /data (the relay's own) whatever the database:
# with PostgreSQL the default, ./data/spool, would be under the root-owned /app.
ENV RELAY_SPOOL_DIR=/data/spool
# Port 465 without root: the compose file grants CAP_NET_BIND_SERVICE.
EXPOSE 465
ENTRYPOINT ["relay"]
CMD ["serve"]
