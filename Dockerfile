FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY router_worker ./router_worker
COPY producers ./producers
COPY consumers ./consumers
COPY schemas ./schemas
RUN pip install --no-cache-dir . && mkdir -p /var/log
ENTRYPOINT ["router-worker"]
CMD ["run"]
