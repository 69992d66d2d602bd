# Keyless image: pinned dependencies from requirements.lock, runs as a fixed non-root uid.
FROM python:3.12-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# uid 10001 is also what `keyless iptables --uid` exempts from redirection (no proxy loop).
RUN useradd --uid 10001 --user-group --home-dir /var/lib/keyless --create-home keyless \
 && install -d -o 10001 -g 10001 -m 0755 /var/run/keyless-ca
# iptables for the sidecar's init step (`keyless iptables --apply`, run as root with NET_ADMIN).
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/keyless
COPY requirements.lock pyproject.toml README.md ./
RUN pip install --no-cache-dir --require-hashes -r requirements.lock
COPY proxy ./proxy
# The wheel carries these (pyproject.toml force-include): `keyless demo` and `keyless init` work
# from the installed package, whatever the working directory.
COPY policies ./policies
COPY keyless.yaml LICENSE ./
RUN pip install --no-cache-dir --no-deps . && keyless --version
USER 10001
EXPOSE 8080 8081 15001
ENTRYPOINT ["keyless"]
CMD ["run", "-c", "/etc/keyless/keyless.yaml"]
