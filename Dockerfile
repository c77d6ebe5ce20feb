# One image for every service of compose.yaml: the daemons, the device models and the toolstack.
# `make image` builds it with no registry (scripts/build-image.sh): the base is Debian bookworm
# bootstrapped here and `docker import`ed; the wheels come from build/wheelhouse, built on the
# host, and are installed with --no-index, so this build needs no network.
FROM physmap-lab-base:bookworm
RUN python3 -m venv /opt/physmap-lab
ENV PATH=/opt/physmap-lab/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# The dependencies first: this layer stays cached until pyproject.toml changes.
COPY build/wheelhouse/deps /opt/wheelhouse/deps
RUN pip install -q --no-index --no-cache-dir -r /opt/wheelhouse/deps/requirements.txt \
        --find-links /opt/wheelhouse/deps
COPY build/wheelhouse/project /opt/wheelhouse/project
RUN pip install -q --no-index --no-cache-dir --find-links /opt/wheelhouse/deps \
        /opt/wheelhouse/project/*.whl \
    && pip check
# A fresh named volume mounted here starts as a copy of this tree (audit/ for the audit logs).
RUN mkdir -p /run/physmap-lab/audit
WORKDIR /run/physmap-lab
ENV PHYSMAP_LAB_RUNDIR=/run/physmap-lab \
    XENSTORED_RUNDIR=/run/physmap-lab \
    XENSTORED_PATH=/run/physmap-lab/socket
