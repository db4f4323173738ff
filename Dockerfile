# The training image for GKE (launch/tpu.py jobset --image ...): the project at one commit,
# installed with its pinned dependencies (torch, torch_xla[tpu], jax, flax, gcsfs, ...), so a
# pod start installs nothing. The JobSet refuses an image built from another commit.
#   docker build --build-arg COMMIT=$(git rev-parse HEAD) -t REGION-docker.pkg.dev/PROJECT/REPO/modxla:$(git rev-parse --short HEAD) .
#   docker push REGION-docker.pkg.dev/PROJECT/REPO/modxla:$(git rev-parse --short HEAD)
FROM python:3.11-slim
ARG COMMIT
RUN test -n "$COMMIT" || (echo "--build-arg COMMIT=<the commit the image holds> is required" && exit 1)
WORKDIR /workspace/modxla
# the dependencies first: their layer is reused while only the project's code changes
COPY setup.cfg pyproject.toml README.md ./
COPY modxla/__init__.py modxla/__init__.py
RUN python3 -m pip install --no-cache-dir '.[tpu]' && python3 -m pip uninstall -y modxla
COPY . .
RUN python3 -m pip install --no-cache-dir --no-deps -e . && echo "$COMMIT" > COMMIT
