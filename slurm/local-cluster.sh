#!/usr/bin/env bash
# A real Slurm cluster on this machine: one controller and two compute nodes (n1, n2), both on
# 127.0.0.1, for tests and demos of `efficient-rl submit`.
#
#   slurm/local-cluster.sh install   Debian's slurmctld, slurmd, slurm-client and munge (if missing; root)
#   slurm/local-cluster.sh up        write the config, start munged, slurmctld and two slurmd
#   slurm/local-cluster.sh down      cancel every job, stop the daemons, remove the state
#   slurm/local-cluster.sh status    sinfo
#
# State, logs and the config live in $ERL_SLURM_DIR (default /tmp/erl-slurm). After `up`, point
# the Slurm commands at the config:  export SLURM_CONF=$ERL_SLURM_DIR/slurm.conf
# Each node has $ERL_SLURM_CPUS CPUs (default 2) and advertises $ERL_SLURM_GPUS fake GPUs (default
# 2) as the generic resource "gpu", so `submit --gpus-per-node` is allocated as on a GPU cluster.
set -euo pipefail

DIR=${ERL_SLURM_DIR:-/tmp/erl-slurm}
CONF=$DIR/slurm.conf
CPUS_PER_NODE=${ERL_SLURM_CPUS:-2}
GPUS_PER_NODE=${ERL_SLURM_GPUS:-2}
NODES=(n1 n2)
export SLURM_CONF=$CONF

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return
    fi
    if [ "$(id -u)" != 0 ]; then
        echo "local-cluster: slurmctld/slurmd/sbatch/munged are missing and installing them needs root" >&2
        exit 1
    fi
    local packages=(slurmctld slurmd slurm-client munge)
    export DEBIAN_FRONTEND=noninteractive
    # Package lists may be missing or stale on a fresh machine: refresh them only if needed.
    apt-get install -y -q "${packages[@]}" >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null && apt-get install -y -q "${packages[@]}" >/dev/null; }
}

# Each node's GPUs are links to /dev/null under $DIR/dev/<node>/: slurmd wants a character device
# at each path, but without cgroups it never opens them. From their indices it sets
# CUDA_VISIBLE_DEVICES for the steps of a job that asked for GPUs, as on a real cluster. Nothing
# can compute on them.
write_fake_gpus() {
    local node index
    for node in "${NODES[@]}"; do
        mkdir -p "$DIR/dev/$node"
        for ((index = 0; index < GPUS_PER_NODE; index++)); do ln -sfn /dev/null "$DIR/dev/$node/nvidia$index"; done
    done
}

write_gres_conf() {  # one line per node: its device files, counted and typed by hand (no NVML here)
    local node
    {
        echo "AutoDetect=off"
        for node in "${NODES[@]}"; do
            [ "$GPUS_PER_NODE" -gt 0 ] || break
            echo "NodeName=$node Name=gpu File=$DIR/dev/$node/nvidia[0-$((GPUS_PER_NODE - 1))]"
        done
    } > "$DIR/gres.conf"
}

write_config() {
    mkdir -p "$DIR/state" "$DIR/log"
    for node in "${NODES[@]}"; do mkdir -p "$DIR/spool/$node"; done
    write_fake_gpus
    write_gres_conf
    local gres=""
    if [ "$GPUS_PER_NODE" -gt 0 ]; then gres="Gres=gpu:$GPUS_PER_NODE"; fi
    # Settings that matter on one machine without systemd, cgroups or accounting: see
    # docs/slurm.md. EnforcePartLimits rejects an oversized job at once instead of leaving it
    # pending; cred_expire=10 lets a requeued job start again after ~12 s instead of 2 minutes.
    cat > "$CONF" <<EOF
ClusterName=erl-local
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=16817
SlurmdPort=17001
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
EnforcePartLimits=ALL
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=2,bf_interval=2
ReturnToService=2
MinJobAge=600
KillWait=30
MailProg=/bin/true
GresTypes=gpu
NodeName=n[1-${#NODES[@]}] NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=17001-$((17000 + ${#NODES[@]})) CPUs=$CPUS_PER_NODE $gres State=UNKNOWN
PartitionName=debug Nodes=n[1-${#NODES[@]}] Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    if pgrep -x munged >/dev/null; then return; fi
    mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
    runuser -u munge -- /usr/sbin/munged
}

wait_for_nodes() {
    for _ in $(seq 1 100); do
        if [ "$(sinfo --noheader --responding --states=idle,mixed,allocated --format=%D 2>/dev/null | paste -sd+ | bc)" \
            = "${#NODES[@]}" ]; then
            return
        fi
        sleep 0.2
    done
    echo "local-cluster: nodes did not come up; logs in $DIR/log" >&2
    sinfo >&2 || true
    exit 1
}

up() {
    install_packages
    if [ -f "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
        echo "local-cluster: already up ($CONF)"
        return
    fi
    write_config
    start_munge
    slurmctld -i -f "$CONF"  # -i: ignore state from an earlier cluster in this directory
    for node in "${NODES[@]}"; do slurmd -f "$CONF" -N "$node"; done
    wait_for_nodes
    echo "local-cluster: up; export SLURM_CONF=$CONF"
}

stop_pidfile() {
    local pidfile=$1
    [ -f "$pidfile" ] || return 0
    local pid
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$pidfile"
}

down() {
    if [ -f "$CONF" ]; then scancel --full --quiet --user "$(id -un)" 2>/dev/null || true; fi
    for node in "${NODES[@]}"; do stop_pidfile "$DIR/slurmd-$node.pid"; done
    stop_pidfile "$DIR/slurmctld.pid"
    rm -rf "$DIR"
    echo "local-cluster: down"
}

case ${1:-} in
    install) install_packages ;;
    up) up ;;
    down) down ;;
    status) sinfo ;;
    *) echo "usage: $0 install|up|down|status" >&2; exit 2 ;;
esac
