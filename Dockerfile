# Keyless image: pinned dependencies from requirements.lock, runs as a fixed non-root uid.
FROM python:3.12-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN useradd --uid 10001 --user-group --home-dir /var/lib/keyless --create-home keyless
WORKDIR /opt/keyless
COPY requirements.lock pyproject.toml README.md ./
RUN pip install --no-cache-dir --require-hashes -r requirements.lock
COPY proxy ./proxy
COPY policies ./policies
COPY keyless.yaml ./
RUN pip install --no-cache-dir --no-deps .
USER 10001
EXPOSE 8080 8081
ENTRYPOINT ["keyless"]
CMD ["run", "-c", "/etc/keyless/keyless.yaml"]
