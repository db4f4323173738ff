# The training image for GKE (launch/tpu.py jobset --image ...): Python, git and the pinned
# dependencies of setup.cfg (torch, torch_xla[tpu], gcsfs, ...). The project itself is checked
# out at the launch commit when the pod starts, so one image serves many commits.
#   docker build -t REGION-docker.pkg.dev/PROJECT/REPO/modxla:deps .
#   docker push REGION-docker.pkg.dev/PROJECT/REPO/modxla:deps
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends git ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /deps
COPY setup.cfg pyproject.toml README.md ./
COPY modxla/__init__.py modxla/__init__.py
# install_requires pins torch==2.9.0 and torch_xla==2.9.0; the tpu extra adds libtpu
RUN python3 -m pip install --no-cache-dir '.[tpu]' && python3 -m pip uninstall -y modxla
WORKDIR /workspace
