#!/usr/bin/env bash
# System packages the test suite needs and pip cannot provide: Debian's slurm-wlm and munge, so
# that tests/test_slurm*.py can start a real local cluster (one controller, two slurmd "nodes").
set -euo pipefail
if command -v slurmctld >/dev/null && command -v munged >/dev/null; then
    echo "slurm and munge already installed"
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
echo "installed: $(slurmctld -V), munge $(munged --version 2>&1 | head -1)"
