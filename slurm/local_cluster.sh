#!/usr/bin/env bash
# A real two-node Slurm cluster on this machine, on loopback only: munge, slurmctld and two slurmd
# daemons (node1, node2) on 127.0.0.1 with distinct ports. For tests and trying `parcae submit`.
#
#   slurm/local_cluster.sh start [DIR]   install Debian's packages if missing (needs root + apt), write the
#                                        configs under DIR (default /tmp/parcae-slurm), start the daemons,
#                                        wait until both nodes are idle; prints `export SLURM_CONF=...`
#   slurm/local_cluster.sh status [DIR]  sinfo of the cluster
#   slurm/local_cluster.sh stop [DIR]    cancel jobs, stop slurmd, slurmctld, munged
#
# No network namespaces and no other addresses: every daemon binds and connects to 127.0.0.1.
# Each node declares two GPUs as a GRES (gres.conf, AutoDetect=off) whose device files are symlinks to
# /dev/null named nvidia0/nvidia1: Slurm schedules them and sets SLURM_GPUS_ON_NODE and CUDA_VISIBLE_DEVICES
# for jobs that ask (--gpus-per-node, --gres=gpu:N) as on a GPU cluster; no process can use them.
set -euo pipefail

cmd=${1:-}
D=${2:-${PARCAE_SLURM_DIR:-/tmp/parcae-slurm}}
CONF="$D/etc/slurm.conf"

die() { echo "local_cluster: $*" >&2; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

install_packages() {
    local missing=()
    for exe in slurmctld slurmd sbatch munged; do command -v "$exe" >/dev/null || missing+=("$exe"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" = 0 ] || die "Slurm is not installed (${missing[*]}) and installing it needs root"
    command -v apt-get >/dev/null || die "Slurm is not installed (${missing[*]}) and there is no apt-get"
    # one apt at a time: the tests install chromium the same way, possibly at the same moment (pytest -n)
    (
        flock -w 900 9 || die "another apt-get held /tmp/parcae-apt.lock for 15 minutes"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 --no-install-recommends \
            slurmctld slurmd slurm-client munge >/dev/null
    ) 9>/tmp/parcae-apt.lock
}

write_configs() {
    mkdir -p "$D"/{etc,munge,state,spool,run,log,dev}
    ln -sf /dev/null "$D/dev/nvidia0"
    ln -sf /dev/null "$D/dev/nvidia1"
    chmod 0755 "$D/munge"
    [ -f "$D/munge/munge.key" ] || mungekey -c -k "$D/munge/munge.key" >/dev/null 2>&1 \
        || dd if=/dev/urandom of="$D/munge/munge.key" bs=1024 count=1 status=none
    chmod 600 "$D/munge/munge.key"
    local ctld n1 n2
    ctld=$(free_port); n1=$(free_port); n2=$(free_port)
    cat > "$CONF" <<EOF
ClusterName=parcae-local
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$D/munge/munge.socket.2
SlurmctldPort=$ctld
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/%n
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd-%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$D/log/jobcomp.txt
JobRequeue=1
MinJobAge=600
GresTypes=gpu
NodeName=node1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$n1 CPUs=2 RealMemory=2000 Gres=gpu:2 State=UNKNOWN
NodeName=node2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$n2 CPUs=2 RealMemory=2000 Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    cat > "$D/etc/gres.conf" <<EOF
AutoDetect=off
Name=gpu File=$D/dev/nvidia[0-1]
EOF
}

start() {
    install_packages
    if [ -f "$D/run/slurmctld.pid" ] && kill -0 "$(cat "$D/run/slurmctld.pid")" 2>/dev/null; then
        echo "export SLURM_CONF=$CONF"; return 0
    fi
    write_configs
    export SLURM_CONF="$CONF"
    munged -S "$D/munge/munge.socket.2" --key-file="$D/munge/munge.key" --log-file="$D/log/munged.log" \
        --pid-file="$D/run/munged.pid" --seed-file="$D/munge/munge.seed" -f
    slurmctld -f "$CONF"
    slurmd -f "$CONF" -N node1
    slurmd -f "$CONF" -N node2
    for _ in $(seq 1 100); do
        if [ "$(sinfo -h -o '%t' 2>/dev/null | sort -u | tr -d '\n')" = "idle" ]; then
            echo "export SLURM_CONF=$CONF"; return 0
        fi
        sleep 0.2
    done
    sinfo >&2 || true
    die "the nodes did not become idle; logs in $D/log"
}

stop() {
    export SLURM_CONF="$CONF"
    [ -f "$CONF" ] && scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
    for pidfile in "$D"/run/slurmd-*.pid "$D/run/slurmctld.pid" "$D/run/munged.pid"; do
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$pidfile"
    done
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    status) SLURM_CONF="$CONF" sinfo ;;
    *) die "usage: $0 start|stop|status [DIR]" ;;
esac
