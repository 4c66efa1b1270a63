# syntax=docker/dockerfile:1.7
# One image for every role of dsv4 (gateway, prefill, decode, serve) and for the operator: the operator starts
# pods from its own image with `dsv4 <role>` (DESIGN.md §4). One Dockerfile, three variants:
#
#   docker build --build-arg VARIANT=cuda   -t dsv4:0.1.0-cuda .     # NVIDIA GPUs (torch wheels bundle CUDA)
#   docker build --build-arg VARIANT=ascend -t dsv4:0.1.0-ascend .   # Huawei Ascend (CANN base + torch_npu)
#   docker build --build-arg VARIANT=cpu    -t dsv4:0.1.0-cpu .      # CPU only (small models, the operator)
#
# Versions of Python packages come only from pyproject.toml. The Ascend variant needs TORCH_NPU_VERSION matching
# the pinned torch and the CANN release of the base image.
ARG VARIANT=cuda
ARG CUDA_BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04
ARG ASCEND_BASE=ascendai/cann:8.2.rc1-910b-ubuntu22.04-py3.11
ARG CPU_BASE=python:3.11-slim-bookworm

FROM ${CUDA_BASE} AS base-cuda
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && ln -sf /usr/bin/python3.11 /usr/local/bin/python3
ENV TORCH_INDEX=https://pypi.org/simple

FROM ${ASCEND_BASE} AS base-ascend
# The CANN image ships Python 3.11 and the toolkit; the driver comes from the host (operator's Ascend profile).
ENV TORCH_INDEX=https://download.pytorch.org/whl/cpu \
    LD_LIBRARY_PATH=/usr/local/Ascend/driver/lib64/driver:/usr/local/Ascend/driver/lib64/common:${LD_LIBRARY_PATH}

FROM ${CPU_BASE} AS base-cpu
ENV TORCH_INDEX=https://download.pytorch.org/whl/cpu

FROM base-${VARIANT} AS runtime
ARG VARIANT
ARG TORCH_NPU_VERSION=""
# uid/gid 1000: the operator's pod securityContext runs every role as this non-root user (on Ascend hosts this
# is also HwHiAiUser's conventional id, which owns the device nodes).
RUN (getent group 1000 || groupadd --gid 1000 dsv4) \
 && (getent passwd 1000 || useradd --uid 1000 --gid 1000 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin dsv4)
WORKDIR /opt/dsv4/src
COPY pyproject.toml setup.py README.md ./
COPY model_runtime model_runtime
COPY kernels kernels
COPY services services
COPY operator operator
RUN python3 -m venv /opt/dsv4/venv \
 && /opt/dsv4/venv/bin/pip install --no-cache-dir --extra-index-url "${TORCH_INDEX}" . \
 && if [ "${VARIANT}" = "ascend" ]; then \
      test -n "${TORCH_NPU_VERSION}" || { echo "set --build-arg TORCH_NPU_VERSION" >&2; exit 1; }; \
      /opt/dsv4/venv/bin/pip install --no-cache-dir "torch-npu==${TORCH_NPU_VERSION}"; \
    fi \
 && rm -rf /opt/dsv4/src
WORKDIR /tmp
# The root filesystem is mounted read-only by the operator: caches live in the /tmp emptyDir.
ENV PATH=/opt/dsv4/venv/bin:${PATH} \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/cache \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DSV4_IMAGE_VARIANT=${VARIANT}
USER 1000:1000
EXPOSE 8000 8100
CMD ["dsv4", "--help"]
