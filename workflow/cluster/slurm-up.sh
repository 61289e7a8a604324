#!/usr/bin/env bash
# Bring up a one-node Slurm cluster on this machine, on loopback, with everything under STATE_DIR:
#   workflow/cluster/slurm-up.sh STATE_DIR      then   source STATE_DIR/slurm.env   (SLURM_CONF for sbatch, squeue...)
#   workflow/cluster/down.sh STATE_DIR          stops exactly what this started (pid files), and cancels its jobs
#
# Installs Debian's slurmctld, slurmd, slurm-client and munge when missing (apt-get; Slurm 22.05 on Debian 12), writes
# STATE_DIR/slurm.conf from slurm.conf.in for this machine (`slurmd -C`: CPUs, sockets, cores, memory), starts a
# private munged (own key and socket), slurmctld and slurmd as plain background processes (no systemd needed), and
# waits until `sinfo` shows the node idle. Nothing under /etc is written; ports are free ones picked now.
# Needs root (slurmd starts jobs as their user). Exit status: 0 up, 1 failed (what was started is stopped again),
# 2 cannot run on this machine (not root; packages missing and no apt-get): the reason is on stderr.
# Environment: SLURM_PARTITION (default "local"), SLURM_UP_TIMEOUT (seconds to wait for the node, default 120).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"

[ "$(id -u)" -eq 0 ] || cannot "a Slurm node daemon must run as root (slurmd starts jobs as their owner)"
STATE=$(state_dir "${1:-}")
PARTITION=${SLURM_PARTITION:-local}
TIMEOUT=${SLURM_UP_TIMEOUT:-120}
PACKAGES=(slurmctld slurmd slurm-client munge)

missing=()
for tool in slurmctld slurmd sbatch squeue scontrol munged mungekey; do
  command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null 2>&1 || cannot "missing ${missing[*]} and no apt-get to install ${PACKAGES[*]}"
  echo "installing ${PACKAGES[*]} (missing: ${missing[*]})" >&2
  export DEBIAN_FRONTEND=noninteractive
  # The package scripts try to start the daemons; with no init system they cannot, and we start our own anyway.
  timeout 600 apt-get update -q >"$STATE/log/apt.log" 2>&1 &&
    timeout 900 apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >>"$STATE/log/apt.log" 2>&1 ||
    cannot "apt-get install ${PACKAGES[*]} failed (no package mirror?); see $STATE/log/apt.log"
fi
export PATH="$PATH:/usr/sbin:/sbin"

for name in munged slurmctld slurmd; do
  alive "$STATE" "$name" && die "$name is already running from $STATE: run down.sh $STATE first"
done
# munged refuses a socket in a directory that not everyone can traverse (pytest's 0700 temporary directories).
dir=$STATE
while [ "$dir" != / ]; do
  [ "$(( 0$(stat -c %a "$dir") & 01 ))" -ne 0 ] ||
    die "$dir is not traversable by others (mode $(stat -c %a "$dir")); munged needs every directory above its socket to be (chmod o+x, or use another STATE_DIR)"
  dir=$(dirname "$dir")
done

# On failure from here on, stop whatever was started.
trap 'status=$?; [ $status -eq 0 ] || "$here/down.sh" "$STATE" >&2 || true; exit $status' EXIT

mkdir -p "$STATE/munge" "$STATE/slurmctld" "$STATE/slurmd"
chmod 0755 "$STATE" "$STATE/munge"
[ -s "$STATE/munge/munge.key" ] || mungekey --create --keyfile="$STATE/munge/munge.key" --bits=1024
chmod 0600 "$STATE/munge/munge.key"

node=$(hostname -s)
# `slurmd -C` prints e.g. "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1
# RealMemory=24105": keep the hardware fields, use our own node name and address.
hardware=$(slurmd -C | head -n 1 | tr ' ' '\n' | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore|RealMemory)=' | tr '\n' ' ')
echo "$hardware" | grep -q 'CPUs=' || die "slurmd -C gave no CPU count: $(slurmd -C 2>&1 | head -n 2)"
ctld_port=$(free_port)
slurmd_port=$(free_port)
[ "$ctld_port" != "$slurmd_port" ] || slurmd_port=$(free_port)
sed -e "s|@STATE@|$STATE|g" -e "s|@NODE@|$node|g" -e "s|@CTLD_PORT@|$ctld_port|g" \
  -e "s|@SLURMD_PORT@|$slurmd_port|g" -e "s|@NODE_HARDWARE@|$hardware|g" -e "s|@PARTITION@|$PARTITION|g" \
  "$here/slurm.conf.in" >"$STATE/slurm.conf"
grep -q '@[A-Z_]*@' "$STATE/slurm.conf" && die "unfilled fields left in $STATE/slurm.conf"
export SLURM_CONF="$STATE/slurm.conf"
# The client commands, bound to this cluster's config. SLURM_CONF alone is not enough: inside each job,
# snakemake-executor-plugin-slurm-jobstep (0.6) drops every SLURM_* variable but the job's identity before its nested
# `srun`, SLURM_CONF included, and srun without it looks for /etc/slurm/slurm.conf (a real site's place, which we do
# not write). Jobs inherit PATH (sbatch --export=ALL), so their srun is this one too.
mkdir -p "$STATE/bin"
for tool in srun sbatch squeue sinfo scontrol scancel sacct; do
  real=$(command -v "$tool") || die "no $tool on PATH after installing ${PACKAGES[*]}"
  printf '#!/bin/sh\n# %s of the Slurm cluster in %s (written by slurm-up.sh)\nSLURM_CONF=%s exec %s "$@"\n' \
    "$tool" "$STATE" "$SLURM_CONF" "$real" >"$STATE/bin/$tool"
  chmod 0755 "$STATE/bin/$tool"
done
cat >"$STATE/slurm.env" <<EOF
# Source this to talk to the cluster brought up in $STATE (sbatch, squeue, sinfo, scontrol, snakemake --executor slurm).
export SLURM_CONF=$STATE/slurm.conf
export PATH="$STATE/bin:\$PATH:/usr/sbin:/sbin"
EOF

munged --key-file="$STATE/munge/munge.key" --socket="$STATE/munge/munge.socket" \
  --pid-file="$STATE/pids/munged.pid" --log-file="$STATE/log/munged.log" --seed-file="$STATE/munge/munged.seed" ||
  die "munged did not start; see $STATE/log/munged.log"
wait_for_pidfile "$STATE" munged 10
slurmctld -f "$SLURM_CONF" -i || die "slurmctld did not start; see $STATE/log/slurmctld.log"
wait_for_pidfile "$STATE" slurmctld 30
slurmd -f "$SLURM_CONF" -N "$node" || die "slurmd did not start; see $STATE/log/slurmd.log"
wait_for_pidfile "$STATE" slurmd 30

deadline=$((SECONDS + TIMEOUT))
until [ "$(timeout 10 sinfo -h -n "$node" -o %T 2>/dev/null || true)" = idle ]; do
  for name in munged slurmctld slurmd; do
    alive "$STATE" "$name" || die "$name exited while the cluster came up; see $STATE/log/$name.log"
  done
  [ $SECONDS -lt $deadline ] || die "node $node not idle after ${TIMEOUT}s: $(timeout 10 sinfo -h -N -o '%N %T %E' 2>&1 || true); see $STATE/log/"
  sleep 1
done
echo "Slurm up: node $node ($hardware) in partition $PARTITION, controller 127.0.0.1:$ctld_port; source $STATE/slurm.env"
