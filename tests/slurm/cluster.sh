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
# SLURM_CONF=$DINO_SLURM_DIR/slurm.conf), and `down` removes it. A second cluster can run beside the first one
# with another DINO_SLURM_DIR and DINO_SLURM_PORT (slurmctld's port, default 6817; slurmd uses the next one).
# Needs root: slurmd runs jobs as their user and munged runs as the munge user. There is no systemd and no cgroup
# here, so the daemons are started directly and the config avoids cgroup plugins (proctrack/linuxproc, task/none).
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
PORT="${DINO_SLURM_PORT:-6817}"
# Job processes carry SLURM_CLUSTER_NAME, which `down` uses to find leftovers: one name per directory.
# (slurmctld refuses to restart on a state directory saved under another name, so the default stays fixed.)
if [ "$DIR" = /tmp/dino-slurm ]; then CLUSTER_NAME=dinotest; else CLUSTER_NAME="dino$(printf %s "$DIR" | md5sum | cut -c1-8)"; fi
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
        local why; why="$(grep -v '^\s*$' "$log" | tail -n 1)"
        tail -n 5 "$log" >&2; rm -f "$log"
        die "apt-get could not install ${PACKAGES[*]} (${why:-no output})"
    fi
    rm -f "$log"
    installed || die "packages installed but the slurm/munge commands are missing"
    say "installed slurm $(slurm_version)"
}

# --- processes ------------------------------------------------------------------------------------------

# Field $2 of /proc/$1/stat counted after the command name, which may contain spaces: 1 = state, 2 = ppid.
stat_field() { local st; st="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1; st="${st##*) }"; cut -d' ' -f"$2" <<<"$st"; }

# Whether pid $1 runs (a killed daemon stays a zombie until init reaps it, which can take a moment here).
alive() { local st; st="$(stat_field "$1" 1)" && [ "$st" != Z ]; }

# pid of $1 (munged|slurmctld|slurmd) from its pid file, if that process is alive and really is $1.
pid_of() {
    local name="$1" file pid
    case "$name" in
        munged) file="$MUNGE_DIR/munged.pid" ;;
        *) file="$DIR/$name.pid" ;;
    esac
    [ -s "$file" ] || return 1
    pid="$(tr -dc 0-9 <"$file")"
    [ -n "$pid" ] && alive "$pid" && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] && echo "$pid"
}

ppid_of() { stat_field "$1" 2 || echo 0; }

# pids whose environment says they belong to this cluster ($OWNER: daemons and slurmstepd) or to one of its jobs
# (SLURM_CLUSTER_NAME=$CLUSTER_NAME, which slurmstepd sets for job processes), except this script, its ancestors
# and its descendants (in case it is itself run from a job of this cluster).
our_pids() {
    local me=$$ pid p ours
    for pid in $(ls /proc | grep -E '^[0-9]+$'); do
        tr '\0' '\n' 2>/dev/null <"/proc/$pid/environ" \
            | grep -qxF -e "$OWNER" -e "SLURM_CLUSTER_NAME=$CLUSTER_NAME" || continue
        alive "$pid" || continue
        ours=1
        p=$pid; while [ "$p" -gt 1 ]; do [ "$p" = "$me" ] && { ours=0; break; }; p="$(ppid_of "$p")"; done
        p=$me; while [ "$p" -gt 1 ]; do [ "$p" = "$pid" ] && { ours=0; break; }; p="$(ppid_of "$p")"; done
        [ $ours = 1 ] && echo "$pid"
    done
    return 0
}

# Stop our three daemons: TERM, up to 10 s, then KILL. Running jobs are left alone (their slurmstepd
# processes outlive slurmd, and a restarted slurmd/slurmctld picks them up again).
kill_daemons() {
    local name pid pids=() deadline
    for name in slurmd slurmctld munged; do
        pid="$(pid_of "$name" || true)"; [ -n "$pid" ] && pids+=("$pid")
    done
    # Also daemons found by their environment (e.g. a pid file overwritten by a half-started second copy).
    for pid in $(our_pids); do
        case "$(cat "/proc/$pid/comm" 2>/dev/null)" in munged|slurmctld|slurmd) pids+=("$pid") ;; esac
    done
    [ "${#pids[@]}" -gt 0 ] || return 0
    kill -TERM "${pids[@]}" 2>/dev/null || true
    deadline=$((SECONDS + 10))
    for pid in "${pids[@]}"; do
        while alive "$pid" && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
    done
    for pid in "${pids[@]}"; do alive "$pid" && kill -KILL "$pid" 2>/dev/null; done
    return 0
}

# After the daemons: KILL what is left of jobs (slurmstepd and job processes), e.g. after a slurmd crash.
kill_leftovers() {
    local pids=($(our_pids))
    [ "${#pids[@]}" -gt 0 ] || return 0
    say "killing ${#pids[@]} leftover process(es) of jobs: ${pids[*]}"
    kill -KILL "${pids[@]}" 2>/dev/null || true
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
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
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

# /etc/slurm/slurm.conf -> our slurm.conf, unless it is a file or a live link to another cluster's config.
link_etc_conf() {
    mkdir -p /etc/slurm
    if [ ! -e "$ETC_CONF" ] || { [ -L "$ETC_CONF" ] && [ "$(readlink "$ETC_CONF")" = "$CONF" ]; }; then
        ln -sfn "$CONF" "$ETC_CONF"   # ! -e is also true for a dangling link (a cluster since removed)
    else
        say "NOTE: $ETC_CONF is not ours; left alone. For plain sbatch/squeue: export SLURM_CONF=$CONF"
    fi
}

unlink_etc_conf() {
    if [ -L "$ETC_CONF" ] && [ "$(readlink "$ETC_CONF")" = "$CONF" ]; then rm -f "$ETC_CONF"; fi
}

# --- commands -------------------------------------------------------------------------------------------

# $DIR is ours to fill and to delete: new, empty, or holding a slurm.conf written by this script
# (a guard against e.g. DINO_SLURM_DIR=/tmp, which `down` would otherwise wipe).
check_dir() {
    [ ! -e "$DIR" ] && return 0
    [ -d "$DIR" ] && [ "$DIR" != / ] || die "$DIR is not a directory we can use"
    [ -z "$(ls -A "$DIR")" ] && return 0
    head -n 1 "$CONF" 2>/dev/null | grep -q '^# Written by tests/slurm/cluster.sh' \
        || die "$DIR is not empty and has no slurm.conf of ours: set DINO_SLURM_DIR to a new directory"
}

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
    check_dir
    if healthy; then say "already running, reused ($CONF)"; link_etc_conf; return 0; fi
    local t0=$SECONDS
    kill_daemons  # what is left of a crashed or half-started cluster; its state and jobs are kept
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
    need_root "down"
    check_dir
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
    kill_leftovers
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
    if ! healthy; then
        say "daemons running but the cluster is not healthy"; scontrol ping 2>&1 || true; sinfo 2>&1 || true
        return 1
    fi
    sinfo
    squeue
    say "healthy; config $CONF"
}

case "${1:-}" in
    install) cmd_install ;;
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) echo "usage: $0 install|up|down|status   (env: DINO_SLURM_DIR [/tmp/dino-slurm], DINO_SLURM_PORT [6817])" >&2
       echo "exit status: 0 ok; 1 failed (status: not healthy); 2 usage; 3 (status) not installed" >&2
       exit 2 ;;
esac
