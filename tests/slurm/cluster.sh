#!/usr/bin/env bash
# A real single-node SLURM cluster (Debian's slurm 22.05 + munge) for tests, started and stopped by hand.
#
#   bash tests/slurm/cluster.sh install   # apt-get the packages (skipped when already installed)
#   bash tests/slurm/cluster.sh up        # start munged, slurmctld, slurmd (reuses a healthy running cluster)
#   bash tests/slurm/cluster.sh status    # daemons, node and queue; exit 0 only when healthy
#   bash tests/slurm/cluster.sh down      # cancel jobs, kill our daemons, remove everything we wrote
#
# Everything lives in one directory, $DINO_SLURM_DIR (default /tmp/dino-slurm): slurm.conf, the state and spool
# directories, pid and log files, and a private munge socket (so a system munged, if any, is never touched).
# The only thing written outside it is /etc/slurm/slurm.conf, a symlink to $DINO_SLURM_DIR/slurm.conf, so that
# plain `sbatch`/`squeue` work from any shell; it is left alone if it exists and is not ours (then export
# SLURM_CONF=$DINO_SLURM_DIR/slurm.conf), and `down` removes it. Needs root: slurmd runs jobs as their user and
# munged runs as the munge user. There is no systemd or cgroup here, so the daemons are started directly and
# the config avoids cgroup plugins (proctrack/linuxproc, task/none).
#
# Timing knobs (why they are not the defaults): AuthInfo cred_expire=10 (default 120 s) is how long a requeued
# job waits before it may start again; sched_interval/bf_interval make the scheduler pick it up within seconds.
# There is no accounting database, so `sacct` fails: ask `scontrol show job JOBID` instead (MinJobAge keeps
# finished jobs visible to it for an hour).
set -euo pipefail

DIR="${DINO_SLURM_DIR:-/tmp/dino-slurm}"
CONF="$DIR/slurm.conf"
ETC_CONF=/etc/slurm/slurm.conf
MUNGE_DIR="$DIR/munge"
MUNGE_SOCKET="$MUNGE_DIR/munge.socket"
MUNGE_KEY=/etc/munge/munge.key
CLUSTER_NAME=dinotest
NODE="$(hostname -s)"
PACKAGES=(slurmctld slurmd slurm-client munge)
export SLURM_CONF="$CONF"
# Every daemon we start carries DINO_SLURM_OWNER=$DIR in its environment (so do the slurmstepd processes that
# slurmd forks), so `down` finds our processes even when a pid file is stale or missing, and never touches
# anyone else's. It is set only on the daemons' command lines, never exported here.
OWNER="DINO_SLURM_OWNER=$DIR"

say() { echo "slurm-cluster: $*"; }
die() { echo "slurm-cluster: ERROR: $*" >&2; exit 1; }

installed() {
    command -v munged >/dev/null && command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v scontrol >/dev/null
}

slurm_version() { dpkg-query -W -f '${Version}' slurmctld 2>/dev/null || echo "(version unknown)"; }

need_root() { [ "$(id -u)" -eq 0 ] || die "$1 needs root (slurmd and munged must run as root/munge)"; }

cmd_install() {
    if installed; then say "packages already installed (slurm $(slurm_version))"; return 0; fi
    need_root "install"
    command -v apt-get >/dev/null || die "apt-get not found: install ${PACKAGES[*]} by hand"
    say "installing ${PACKAGES[*]} with apt-get"
    local log; log="$(mktemp)"
    if ! { timeout 300 apt-get update -qq \
           && DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq --no-install-recommends \
                  "${PACKAGES[@]}"; } >"$log" 2>&1; then
        tail -n 5 "$log" >&2; rm -f "$log"
        die "apt-get could not install ${PACKAGES[*]}"
    fi
    rm -f "$log"
    installed || die "packages installed but the slurm/munge commands are missing"
    say "installed slurm $(slurm_version)"
}

# --- processes ------------------------------------------------------------------------------------------

# pid of $1 (munged|slurmctld|slurmd) from its pid file, if that process is alive and really is $1.
pid_of() {
    local name="$1" file pid
    case "$name" in
        munged) file="$MUNGE_DIR/munged.pid" ;;
        *) file="$DIR/$name.pid" ;;
    esac
    [ -s "$file" ] || return 1
    pid="$(tr -dc 0-9 <"$file")"
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] && echo "$pid"
}

ppid_of() { awk '{print $4}' "/proc/$1/stat" 2>/dev/null || echo 0; }

# pids whose environment says they belong to this cluster ($OWNER) or to one of its jobs
# (SLURM_CLUSTER_NAME=dinotest, which slurmstepd sets for job processes), except this script, its ancestors
# and its descendants (in case it is itself run from a job of this cluster).
our_pids() {
    local me=$$ pid p ours
    for pid in $(ls /proc | grep -E '^[0-9]+$'); do
        tr '\0' '\n' 2>/dev/null <"/proc/$pid/environ" \
            | grep -qxF -e "$OWNER" -e "SLURM_CLUSTER_NAME=$CLUSTER_NAME" || continue
        ours=1
        p=$pid; while [ "$p" -gt 1 ]; do [ "$p" = "$me" ] && { ours=0; break; }; p="$(ppid_of "$p")"; done
        p=$me; while [ "$p" -gt 1 ]; do [ "$p" = "$pid" ] && { ours=0; break; }; p="$(ppid_of "$p")"; done
        [ $ours = 1 ] && echo "$pid"
    done
    return 0
}

alive() { kill -0 "$1" 2>/dev/null; }

# Send TERM to our daemons, wait up to 10 s, then KILL them and every other process of ours that is left.
kill_daemons() {
    local name pid pids=() deadline
    for name in slurmd slurmctld munged; do
        pid="$(pid_of "$name" || true)"; [ -n "$pid" ] && pids+=("$pid")
    done
    # Also those found by environment (a daemon whose pid file is gone), but only the daemons at this stage.
    for pid in $(our_pids); do
        case "$(cat "/proc/$pid/comm" 2>/dev/null)" in munged|slurmctld|slurmd) pids+=("$pid") ;; esac
    done
    [ "${#pids[@]}" -gt 0 ] && kill -TERM "${pids[@]}" 2>/dev/null || true
    deadline=$((SECONDS + 10))
    for pid in "${pids[@]}"; do
        while alive "$pid" && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
    done
    # Whatever survived, and leftovers of jobs (slurmstepd and job processes) once the daemons are gone.
    pids=($(our_pids))
    if [ "${#pids[@]}" -gt 0 ]; then
        say "killing ${#pids[@]} leftover process(es): ${pids[*]}"
        kill -KILL "${pids[@]}" 2>/dev/null || true
    fi
}

# --- health ---------------------------------------------------------------------------------------------

node_state() { sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -n 1; }

munge_ok() { munge -n -S "$MUNGE_SOCKET" 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; }

ctld_ok() { timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP'; }

# Healthy: the three daemons of ours are alive, munge answers, slurmctld answers, and the node takes jobs.
# (Client commands retry for 60 s when $SLURM_CONF is missing, hence the check on it first.)
healthy() {
    local n
    [ -e "$CONF" ] || return 1
    for n in munged slurmctld slurmd; do pid_of "$n" >/dev/null || return 1; done
    munge_ok && ctld_ok || return 1
    case "$(node_state)" in idle|mixed|allocated|completing) return 0 ;; *) return 1 ;; esac
}

# --- config ---------------------------------------------------------------------------------------------

write_conf() {
    # The node's real topology from `slurmd -C` (CPUs, sockets, cores, threads), memory capped at 20000 MB
    # and at 85% of the machine, so the node is never drained for "Low RealMemory".
    local hw cpus mem
    hw="$(slurmd -C 2>/dev/null | head -n 1 || true)"
    cpus="$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$hw")"; cpus="${cpus:-$(nproc)}"
    mem="$(awk '/MemTotal/ {print int($2 / 1024 * 0.85)}' /proc/meminfo)"
    [ "$mem" -gt 20000 ] && mem=20000
    local topo="CPUs=$cpus"
    if [[ "$hw" =~ (Boards=[0-9]+\ SocketsPerBoard=[0-9]+\ CoresPerSocket=[0-9]+\ ThreadsPerCore=[0-9]+) ]]; then
        topo="CPUs=$cpus ${BASH_REMATCH[1]}"
    fi
    cat >"$CONF.new" <<EOF
# Written by tests/slurm/cluster.sh; removed by 'cluster.sh down'. Single-node test cluster, no accounting.
ClusterName=$CLUSTER_NAME
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# private munge socket; requeued jobs may restart after cred_expire seconds (default 120)
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no systemd/cgroups here
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# jobs that do not ask for memory get their share per CPU (not the whole node, which would serialise jobs)
DefMemPerCPU=$((mem / cpus))
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=5
JobRequeue=1
KillWait=5
MinJobAge=3600
ReturnToService=2
InactiveLimit=0
NodeName=$NODE NodeAddr=127.0.0.1 $topo RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.new" "$CONF"
}

link_etc_conf() {
    mkdir -p /etc/slurm
    if [ -L "$ETC_CONF" ] || [ ! -e "$ETC_CONF" ]; then
        ln -sfn "$CONF" "$ETC_CONF"
    else
        say "NOTE: $ETC_CONF exists and is not ours; left alone. Use: export SLURM_CONF=$CONF"
    fi
}

unlink_etc_conf() {
    if [ -L "$ETC_CONF" ] && [ "$(readlink "$ETC_CONF")" = "$CONF" ]; then rm -f "$ETC_CONF"; fi
}

# --- commands -------------------------------------------------------------------------------------------

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.2 s; fail with the logs after SECONDS.
wait_for() {
    local secs="$1" what="$2"; shift 2
    local deadline=$((SECONDS + secs))
    until "$@"; do
        if [ $SECONDS -ge $deadline ]; then
            echo "slurm-cluster: ERROR: $what not ready after ${secs}s; last log lines:" >&2
            tail -n 8 "$MUNGE_DIR/munged.log" "$DIR/slurmctld.log" "$DIR/slurmd.log" 2>/dev/null >&2 || true
            return 1
        fi
        sleep 0.2
    done
}

node_ready() {
    case "$(node_state)" in
        idle|mixed|allocated|completing) return 0 ;;
        # a node that was down/drained before (e.g. after a crash) is put back in service
        down*|drain*|fail*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true; return 1 ;;
        *) return 1 ;;
    esac
}

cmd_up() {
    need_root "up"
    installed || die "slurm/munge not installed: run 'bash $0 install' first"
    if healthy; then say "already running, reused ($CONF)"; link_etc_conf; return 0; fi
    local t0=$SECONDS
    kill_daemons  # leftovers of a crashed or half-started cluster; its state directory is kept
    mkdir -p "$DIR/state" "$DIR/spool" "$MUNGE_DIR"
    chmod 0755 "$DIR"
    chown munge:munge "$MUNGE_DIR"; chmod 0755 "$MUNGE_DIR"  # munged refuses a socket dir it does not own
    write_conf
    link_etc_conf

    if [ ! -s "$MUNGE_KEY" ]; then
        say "creating $MUNGE_KEY"
        mkdir -p /etc/munge
        mungekey --create --keyfile="$MUNGE_KEY" 2>/dev/null \
            || dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
    fi
    chown munge:munge /etc/munge "$MUNGE_KEY"; chmod 0700 /etc/munge; chmod 0400 "$MUNGE_KEY"

    # munged forks into the background itself; it must run as the munge user.
    env "$OWNER" runuser -u munge -- munged --socket="$MUNGE_SOCKET" --pid-file="$MUNGE_DIR/munged.pid" \
        --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed" \
        || { kill_daemons; die "munged failed to start (see $MUNGE_DIR/munged.log)"; }
    wait_for 10 munged munge_ok || { kill_daemons; exit 1; }

    # -i: ignore unreadable state files (a daemon killed with -9 may leave one half written).
    env "$OWNER" slurmctld -i || { kill_daemons; die "slurmctld failed to start (see $DIR/slurmctld.log)"; }
    wait_for 20 slurmctld ctld_ok || { kill_daemons; exit 1; }
    env "$OWNER" slurmd -N "$NODE" || { kill_daemons; die "slurmd failed to start (see $DIR/slurmd.log)"; }
    wait_for 30 "node $NODE" node_ready || { kill_daemons; exit 1; }
    say "up in $((SECONDS - t0))s: node $NODE $(node_state), partition debug; config $CONF"
}

cmd_down() {
    if [ -e "$CONF" ] && pid_of slurmctld >/dev/null && ctld_ok; then
        # Cancel jobs through slurm first so that their processes are ended cleanly (KillWait=5).
        local jobs; jobs="$(squeue -h -o %A 2>/dev/null || true)"
        if [ -n "$jobs" ]; then
            say "cancelling jobs: $(echo $jobs)"
            scancel $jobs 2>/dev/null || true
            local deadline=$((SECONDS + 15))
            while [ -n "$(squeue -h -o %A 2>/dev/null)" ] && [ $SECONDS -lt $deadline ]; do sleep 0.5; done
        fi
    fi
    kill_daemons
    unlink_etc_conf
    rm -rf "$DIR"
    say "down ($DIR removed)"
}

cmd_status() {
    local n pid rc=0
    installed || { say "not installed"; return 3; }
    for n in munged slurmctld slurmd; do
        if pid="$(pid_of "$n")"; then say "$n running (pid $pid)"; else say "$n NOT running"; rc=1; fi
    done
    [ $rc -eq 0 ] || return $rc
    healthy || { say "daemons running but the cluster is not healthy"; scontrol ping 2>&1 || true; sinfo 2>&1 || true; return 1; }
    sinfo
    squeue
    say "healthy; config $CONF"
}

case "${1:-}" in
    install) cmd_install ;;
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) echo "usage: $0 install|up|down|status   (directory: \$DINO_SLURM_DIR, default /tmp/dino-slurm)" >&2; exit 2 ;;
esac
