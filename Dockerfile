# One image for every service of compose.yaml: the daemons, the device models and the toolstack.
FROM python:3.11-slim-bookworm
RUN apt-get update \
    && apt-get install -y --no-install-recommends xenstore-utils \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/physmap-lab
COPY pyproject.toml README.md ./
COPY xenstored_sim ./xenstored_sim
COPY hypervisor_sim ./hypervisor_sim
COPY qemu_model ./qemu_model
COPY toolstack ./toolstack
COPY physmap_lab ./physmap_lab
RUN pip install --no-cache-dir .
ENV PHYSMAP_LAB_RUNDIR=/run/physmap-lab \
    XENSTORED_RUNDIR=/run/physmap-lab \
    XENSTORED_PATH=/run/physmap-lab/socket
