# CBox image "py": Python with common data tools.
#
#   sudo make image NAME=py DOCKERFILE=rootfs/Dockerfile.py
#   curl -X POST localhost:7000/v1/vms -d '{"vmName": "a1", "image": "py"}'
#
# FROM cbox-base: the debootstrap base of every CBox image (Debian minbase with python3,
# bash, coreutils, iproute2, procps, ca-certificates, curl), imported as a local image by
# rootfs/build.py. The build then adds guest_agent.py (the guest's init), the cbox_callback
# command and module, and checks them, as for every image. Nothing here runs at boot
# (CMD, ENTRYPOINT, ENV, USER and EXPOSE have no effect in a CBox guest): the initramfs
# starts the agent, and each exec gets the agent's PATH, HOME=/root and LANG=C.UTF-8.
FROM cbox-base

# Debian's packages: built for the base's python3, no compiler needed, one apt run.
# --no-install-recommends keeps out what a headless guest never uses (Tk, GUI toolkits).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3-numpy python3-pandas python3-scipy python3-matplotlib \
        python3-requests python3-yaml python3-openpyxl \
        python3-pip python3-venv \
        sqlite3 jq \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb

# PyPI works too, during the build (reachable from here) or later from inside a VM with
# egress: Debian marks its python3 as externally managed, so either a venv
# (python3 -m venv /opt/venv && /opt/venv/bin/pip install ...) or, system-wide:
# RUN pip install --no-cache-dir --break-system-packages polars

# the check that each import works, so a broken image fails here and not in a VM
RUN python3 -c "import numpy, pandas, scipy, matplotlib.pyplot, requests, yaml, openpyxl, sqlite3; \
print('numpy', numpy.__version__, 'pandas', pandas.__version__, 'scipy', scipy.__version__)"
