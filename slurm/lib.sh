# shellcheck shell=bash
# Shared by slurm/ray_cluster.sbatch and slurm/ray_cluster_requeue.sbatch (sourced, never run): pick the program,
# start a per-job Ray cluster on the allocated nodes, stop it again on exit.
#
# Ports: every job owns a block of 200 ports, base = 20000 + (SLURM_JOB_ID % 225) * 200 (so 20000..64999), and
# two jobs whose ids differ modulo 225 never share a port, even on the same node (Ray's fixed defaults - 6379,
# 8265, 10001, workers on 10002-19999 - collide as soon as two jobs share a node). RAY_PORT_BASE=<n> moves the
# block to n..n+199. Offsets in the block:
#   +0 GCS (--port)            +1 dashboard               +2 Ray client server     +3 node manager
#   +4 object manager          +5 dashboard agent (http)  +6 dashboard agent (grpc)
#   +7 runtime env agent       +8 metrics export          +9..+199 worker processes (one per process: 191 a node)
# Every node of the job uses the same ports: each runs one Ray node of the job, so they cannot collide.

readonly RAY_PORT_BLOCK=200
readonly RAY_PORT_JOBS=225
# Ray puts unix sockets at <temp dir>/session_<date>_<time>_<us>_<pid>/sockets/plasma_store (about 65 characters
# below the temp dir) and a socket path may not exceed 107 bytes.
readonly RAY_TEMP_DIR_MAX=40

ray_step_pids=()  # the background `srun ... ray start --block` steps, stopped by ray_cluster_stop
nodes=()  # the job's host names, the head's first (set by ray_cluster_start)
program=()  # the program's command line (set by program_argv)

slurm_log() {
    printf '[slurm] %s\n' "$*" >&2
}

slurm_die() {  # slurm_die <exit status> <message>
    slurm_log "error: ${*:2}"
    exit "$1"
}

# Prints its arguments shell-quoted, for logging only (the program is always run from an argv array).
quoted() {
    local shown
    printf -v shown '%q ' "$@"
    printf '%s' "${shown% }"
}

# run -> orchestrator.run, tune -> orchestrator.tune; sets PROGRAM_MODE (run|tune) and PROGRAM_MODULE.
select_program() {
    PROGRAM_MODE=$1
    case $1 in
        run) PROGRAM_MODULE=orchestrator.run ;;
        tune) PROGRAM_MODULE=orchestrator.tune ;;
        *) slurm_die 2 "unknown program '$1': the first argument must be run or tune" ;;
    esac
}

# Sets ray_head_port_args (head only) and ray_node_port_args (every node) from the job's port block.
ray_ports() {
    local base
    if [[ -n ${RAY_PORT_BASE-} ]]; then
        if ! [[ $RAY_PORT_BASE =~ ^[0-9]+$ ]] ||
            ((10#$RAY_PORT_BASE < 1024 || 10#$RAY_PORT_BASE + RAY_PORT_BLOCK > 65536)); then
            slurm_die 2 "RAY_PORT_BASE=$RAY_PORT_BASE: need an integer in 1024..$((65536 - RAY_PORT_BLOCK))"
        fi
        base=$((10#$RAY_PORT_BASE))
    else
        base=$((20000 + 10#$SLURM_JOB_ID % RAY_PORT_JOBS * RAY_PORT_BLOCK))
    fi
    RAY_GCS_PORT=$base
    RAY_PORT_BLOCK_BASE=$base
    ray_head_port_args=(--port="$base" --dashboard-port=$((base + 1)) --ray-client-server-port=$((base + 2)))
    ray_node_port_args=(
        --node-manager-port=$((base + 3)) --object-manager-port=$((base + 4))
        --dashboard-agent-listen-port=$((base + 5)) --dashboard-agent-grpc-port=$((base + 6))
        --runtime-env-agent-port=$((base + 7)) --metrics-export-port=$((base + 8))
        --min-worker-port=$((base + 9)) --max-worker-port=$((base + RAY_PORT_BLOCK - 1))
    )
}

# The head's fixed ports must be free here: the batch script runs on the job's first node, where the head starts.
# (A listener on 0.0.0.0 or 127.0.0.1 answers a loopback connect.) Without this, `ray start` fails further in.
ray_head_ports_free() {
    local spec port what
    for spec in "$RAY_PORT_BLOCK_BASE:GCS" "$((RAY_PORT_BLOCK_BASE + 1)):dashboard" \
        "$((RAY_PORT_BLOCK_BASE + 2)):Ray client server"; do
        port=${spec%%:*}
        what=${spec#*:}
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            slurm_die 1 "port $port ($what) is already in use on $(hostname): another job or service holds it;" \
                "set RAY_PORT_BASE=<n> to move this job to the free block n..n+$((RAY_PORT_BLOCK - 1))"
        fi
    done
}

# Token authentication (Ray >= 2.52; Ray says it becomes the default for every cluster): RAY_AUTH_MODE=token, and
# a new random token for this job in RAY_AUTH_TOKEN. Every step of the job (each node's `ray start`, every `ray`
# call here, the program and the Ray workers it starts) gets it through its environment, never on a command line:
# a process's environment is readable by its own user only, its argv (ps) by everyone. A token the user gives
# (RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH) is kept; RAY_AUTH_MODE=disabled turns authentication off, with a warning.
ray_auth_setup() {
    export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
    if [[ $RAY_AUTH_MODE != token ]]; then
        slurm_log "warning: RAY_AUTH_MODE=$RAY_AUTH_MODE: the job's Ray cluster accepts anyone who reaches its ports"
        return 0
    fi
    if [[ -n ${RAY_AUTH_TOKEN-} || -n ${RAY_AUTH_TOKEN_PATH-} ]]; then
        slurm_log "token authentication with the token given in RAY_AUTH_TOKEN${RAY_AUTH_TOKEN_PATH:+_PATH}"
        return 0
    fi
    local token
    token=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
    [[ ${#token} == 64 ]] || slurm_die 1 "could not read 32 random bytes from /dev/urandom for the Ray token"
    export RAY_AUTH_TOKEN=$token
    slurm_log "token authentication with a new token for this job (in the job's environment only)"
}

# Waits until every node of the job has joined the Ray cluster (each `ray start` names its node after the Slurm
# host name), for RAY_NODES_TIMEOUT seconds (default 300); then fails naming the nodes that did not join.
ray_cluster_wait_nodes() {
    local timeout deadline listed node missing
    timeout=${RAY_NODES_TIMEOUT:-300}
    [[ $timeout =~ ^[0-9]+$ ]] || slurm_die 2 "RAY_NODES_TIMEOUT=$timeout: need a number of seconds"
    deadline=$((SECONDS + 10#$timeout))
    while :; do
        listed=$(ray list nodes --filter state=ALIVE --format json --limit 10000 2>/dev/null) || listed=""
        missing=()
        for node in "${nodes[@]}"; do
            [[ $listed == *"\"node_name\": \"$node\""* ]] || missing+=("$node")
        done
        ((${#missing[@]})) || break
        ((SECONDS < deadline)) || slurm_die 1 "${#missing[@]} of ${#nodes[@]} node(s) did not join the Ray cluster" \
            "within $timeout s: ${missing[*]} (see their ray start output above; resubmit with" \
            "--exclude=$(IFS=,; printf '%s' "${missing[*]}") or raise RAY_NODES_TIMEOUT)"
        sleep 1
    done
    slurm_log "all ${#nodes[@]} node(s) joined the Ray cluster"
}

# Starts a Ray head on the first node of the job and a Ray worker on each other node, each as a background srun
# step, waits until the head answers and every node has joined, and exports RAY_ADDRESS (<head ip>:<GCS port>).
# Installs an EXIT trap that stops the cluster again.
ray_cluster_start() {
    [[ ${SLURM_JOB_ID-} =~ ^[0-9]+$ && -n ${SLURM_JOB_NODELIST-} ]] ||
        slurm_die 2 "SLURM_JOB_ID/SLURM_JOB_NODELIST are not set: submit this script with sbatch"
    ray_ports
    ray_head_ports_free
    ray_auth_setup

    local hostnames head ip_out head_ip node cpus gpus temp_dir timeout deadline
    hostnames=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
    mapfile -t nodes <<<"$hostnames"  # global: ray_cluster_wait_nodes checks them
    head=${nodes[0]}
    [[ -n $head ]] || slurm_die 1 "scontrol show hostnames '$SLURM_JOB_NODELIST' listed no nodes"
    ip_out=$(srun --nodes=1 --ntasks=1 -w "$head" hostname --ip-address)
    read -r head_ip _ <<<"$ip_out"  # a host with several interfaces lists several addresses: take the first
    [[ -n $head_ip ]] || slurm_die 1 "hostname --ip-address on $head printed no address"
    RAY_ADDRESS=$head_ip:$RAY_GCS_PORT
    export RAY_ADDRESS

    # Ray gets the CPUs and GPUs Slurm gave one task (nodes are assumed alike). srun no longer inherits
    # --cpus-per-task from sbatch (Slurm >= 22.05), so it is passed on, or the step would be confined to one CPU.
    cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
    gpus=${SLURM_GPUS_PER_TASK:-${SLURM_GPUS_ON_NODE:-0}}
    gpus=${gpus##*:}  # --gpus-per-task=a100:2 -> 2
    [[ $gpus =~ ^[0-9]+$ ]] || slurm_die 2 "cannot read a GPU count from SLURM_GPUS_PER_TASK/SLURM_GPUS_ON_NODE"
    # One temp dir per job: sessions, logs and sockets of two jobs on a node stay apart.
    temp_dir=${RAY_TMPDIR_ROOT:-/tmp}/ray-${USER:-$(id -un)}-$SLURM_JOB_ID
    if ((${#temp_dir} > RAY_TEMP_DIR_MAX)); then
        slurm_log "warning: Ray temp dir $temp_dir is longer than $RAY_TEMP_DIR_MAX characters: Ray's socket paths" \
            "may exceed the 107-byte limit; set RAY_TMPDIR_ROOT to a shorter directory"
    fi

    trap ray_cluster_stop EXIT
    slurm_log "job $SLURM_JOB_ID: ${#nodes[@]} node(s) ${nodes[*]}; Ray head on $head at $RAY_ADDRESS," \
        "$cpus CPUs and $gpus GPUs a node, temp dir $temp_dir"
    # The dashboard (and the state API Ray Train polls) listens on loopback unless RAY_DASHBOARD_HOST says otherwise.
    srun --nodes=1 --ntasks=1 --cpus-per-task="$cpus" -w "$head" \
        ray start --head --node-ip-address="$head_ip" --node-name="$head" \
        "${ray_head_port_args[@]}" "${ray_node_port_args[@]}" \
        --temp-dir="$temp_dir" --num-cpus="$cpus" --num-gpus="$gpus" \
        --dashboard-host="${RAY_DASHBOARD_HOST:-127.0.0.1}" --block &
    ray_step_pids+=("$!")

    timeout=${RAY_START_TIMEOUT:-120}
    [[ $timeout =~ ^[0-9]+$ ]] || slurm_die 2 "RAY_START_TIMEOUT=$timeout: need a number of seconds"
    deadline=$((SECONDS + 10#$timeout))
    until ray status --address="$RAY_ADDRESS" >/dev/null 2>&1; do
        kill -0 "${ray_step_pids[0]}" 2>/dev/null ||
            slurm_die 1 "the Ray head on $head exited while starting (port taken?): see its output above"
        ((SECONDS < deadline)) || slurm_die 1 "the Ray head at $RAY_ADDRESS did not answer within $timeout s"
        sleep 2
    done
    slurm_log "Ray head is up"

    # Workers let Ray pick their node IP: it takes the address through which the node reaches the head.
    for node in "${nodes[@]:1}"; do
        slurm_log "starting a Ray worker on $node"
        srun --nodes=1 --ntasks=1 --cpus-per-task="$cpus" -w "$node" \
            ray start --address="$RAY_ADDRESS" --node-name="$node" "${ray_node_port_args[@]}" \
            --temp-dir="$temp_dir" --num-cpus="$cpus" --num-gpus="$gpus" --block &
        ray_step_pids+=("$!")
    done
    ray_cluster_wait_nodes
}

# SIGTERM to an srun step reaches its `ray start --block`, which shuts down only its own node's Ray processes.
# (`ray stop` would kill every Ray process of this user on the node, including those of the user's other jobs.)
# The temp dir with the Ray logs is kept.
ray_cluster_stop() {
    ((${#ray_step_pids[@]})) || return 0
    slurm_log "stopping the Ray cluster"
    kill -TERM "${ray_step_pids[@]}" 2>/dev/null || true
    wait "${ray_step_pids[@]}" 2>/dev/null || true
    ray_step_pids=()
}

# Sets `program` (global array): the program's command line on the job's Ray cluster.
program_argv() {
    program=("${PYTHON:-python}" -m "$PROGRAM_MODULE" "$@" "cluster.address=$RAY_ADDRESS")
}

# Runs the program once on the job's Ray cluster; the job's status is the program's.
run_once() {
    local status=0
    program_argv "$@"
    slurm_log "running: $(quoted "${program[@]}")"
    "${program[@]}" || status=$?
    slurm_log "program exited with status $status"
    exit "$status"
}

# Runs the program, resuming its run folder when it can, and requeues the job
#   - on a stop request: USR1 (--signal, before the time limit) or TERM (preemption, scancel). The program gets one
#     SIGTERM (it checkpoints and exits), is waited for, and the job is requeued;
#   - after a crash (an exit status other than 0 and 2), up to RAY_CRASH_REQUEUES times per job (default 2),
#     counted in <out_dir>/<name>/slurm/<job id>.crashes. Status 2 is a bad input (the program's one-line error):
#     a restart would fail the same way, so it ends the job.
# Arguments: the program's items (after select_program); name= is required, out_dir= defaults to runs (both
# read from the command line only, not from YAML files).
run_requeueing() {
    local name="" out_dir=runs resume_given=0 arg marker crash_file crashes limit
    for arg in "$@"; do
        case $arg in
            name=*) name=${arg#name=} ;;
            out_dir=*) out_dir=${arg#out_dir=} ;;
            resume=*) resume_given=1 ;;
        esac
    done
    [[ -n $name ]] || slurm_die 2 "pass name=<run name>: a requeued job resumes the run in <out_dir>/<name>/"
    [[ $out_dir != *://* ]] || slurm_die 2 "out_dir=$out_dir: a requeueing job keeps its resume marker and crash" \
        "count in a POSIX run folder; use a shared folder, or slurm/ray_cluster.sbatch for a run folder on an object store"
    limit=${RAY_CRASH_REQUEUES:-2}
    [[ $limit =~ ^[0-9]+$ ]] || slurm_die 2 "RAY_CRASH_REQUEUES=$limit: need a count (0 = never requeue a crash)"
    if [[ $PROGRAM_MODE == run ]]; then
        marker=$out_dir/$name/checkpoints/driver.pt
    else
        marker=$out_dir/$name/tuner.pkl
    fi
    crash_file=$out_dir/$name/slurm/${SLURM_JOB_ID-}.crashes

    if [[ -n ${SLURM_RESTART_COUNT-} ]]; then
        slurm_log "restart $SLURM_RESTART_COUNT of job ${SLURM_JOB_ID-}"
    fi
    ray_cluster_start

    program_argv "$@"
    if ((resume_given)); then
        slurm_log "resume= given on the command line: not adding resume=true"
    elif [[ -f $marker ]]; then
        slurm_log "found $marker: resuming"
        program+=(resume=true)
    else
        slurm_log "no $marker: fresh start"
    fi

    # The traps go in before the program starts so that no signal can kill this shell in between; a request that
    # comes before the program's pid is known is sent on right after the start.
    stop_requested=0
    stop_sent=0
    program_pid=""
    trap 'request_stop USR1' USR1
    trap 'request_stop TERM' TERM

    slurm_log "running: $(quoted "${program[@]}")"
    "${program[@]}" &
    program_pid=$!
    send_stop

    local status
    while :; do
        status=0
        wait "$program_pid" || status=$?
        # A trapped signal makes `wait` return early (status > 128) while the program still runs: wait again.
        if ((status > 128)) && kill -0 "$program_pid" 2>/dev/null; then
            continue
        fi
        break
    done

    if ((stop_requested)); then
        slurm_log "program exited with status $status after the stop request; requeueing job $SLURM_JOB_ID"
        requeue_job
    fi
    if ((status == 0 || status == 2)); then
        slurm_log "program finished with status $status"
        exit "$status"
    fi
    crashes=$(cat "$crash_file" 2>/dev/null || echo 0)
    [[ $crashes =~ ^[0-9]+$ ]] || crashes=0
    if ((crashes >= limit)); then
        slurm_log "program crashed with status $status; not requeueing: job $SLURM_JOB_ID was requeued after" \
            "$crashes crash(es) already (RAY_CRASH_REQUEUES=$limit)"
        exit "$status"
    fi
    mkdir -p -- "${crash_file%/*}"
    { printf '%s\n' $((crashes + 1)) >"$crash_file.tmp" && mv -- "$crash_file.tmp" "$crash_file"; } ||
        slurm_die 1 "cannot record the crash count in $crash_file: not requeueing"
    slurm_log "program crashed with status $status; requeueing job $SLURM_JOB_ID (crash $((crashes + 1)) of" \
        "at most $limit)"
    requeue_job
}

send_stop() {
    if ((stop_requested && !stop_sent)) && [[ -n $program_pid ]]; then
        stop_sent=1
        slurm_log "sending SIGTERM to the program (pid $program_pid) to checkpoint and stop"
        kill -TERM "$program_pid" 2>/dev/null || true
    fi
}

request_stop() {
    slurm_log "got SIG$1"
    stop_requested=1
    send_stop
}

requeue_job() {
    scontrol requeue "$SLURM_JOB_ID" ||
        slurm_die 1 "scontrol requeue failed (Slurm requeues a preempted job itself); else resubmit the same command"
    exit 0
}
