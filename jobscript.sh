#!/usr/bin/env bash
#SBATCH --job-name=deeplense-ray
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
#
# deeplense-ray on SLURM: one Ray node per SLURM node (the head on the first node of the allocation, a worker
# on each other node, each started with `srun ... ray start --block`), then the job's steps run as Ray drivers
# on the head: simulate a dataset (jobs/simulate.py), optionally train one model (jobs/train.py), then a
# hyperparameter search (jobs/tune.py). Ray is stopped on exit, failure, `scancel` or time-out (trap).
#
#   sbatch jobscript.sh                                            # defaults below, 1 node
#   sbatch --nodes=4 --gpus-per-node=4 jobscript.sh                # 4 nodes x 4 GPUs, one Ray cluster
#   sbatch --export=ALL,NUM_PER_CLASS=20000,MODEL=CvT,NUM_SAMPLES=32 jobscript.sh
#   sbatch --export=ALL,SIMULATE=0,DATA_DIR=/shared/ds/model_ii jobscript.sh     # tune on an existing dataset
#   sbatch --export=ALL,DRY_RUN=1 jobscript.sh     # print the Ray nodes and step commands; start nothing
#
# Every variable below can be set with `sbatch --export=ALL,NAME=value` (or exported before sbatch).
# Results (dataset, Ray Train/Tune storage, MLflow store, Ray token) go to RUN_DIR, which must be on storage
# that every node sees (the submit directory usually is). The GPUs are the allocation's: Ray gets, per node,
# the devices SLURM put in CUDA_VISIBLE_DEVICES (or SLURM_GPUS_ON_NODE); the train step takes one worker per GPU
# of the allocation (simulate and tune find the GPUs in the Ray cluster); an allocation without GPUs runs on CPU.
set -euo pipefail

# ---- where things are -------------------------------------------------------------------------------------
: "${PROJECT_DIR:=${SLURM_SUBMIT_DIR:-$PWD}}"       # repository checkout holding jobs/*.py (shared storage)
: "${VENV:=$PROJECT_DIR/.venv}"                      # virtualenv activated on every node ('' = use PATH as is)
: "${RUN_DIR:=${SLURM_SUBMIT_DIR:-$PWD}/runs/${SLURM_JOB_ID:-local}}"  # results of this job (shared storage)
: "${DATA_DIR:=$RUN_DIR/data}"                       # dataset written by the simulate step / read by train, tune
: "${STORAGE_PATH:=$RUN_DIR/ray_results}"            # Ray Train/Tune storage: checkpoints, trial state
: "${MLFLOW_TRACKING_URI:=sqlite:///$RUN_DIR/mlflow.db}"  # or http://mlflow-host:5000 for a shared server
: "${EXPERIMENT:=deeplense-slurm}"                   # MLflow experiment name

# ---- steps (1 = run, 0 = skip), in this order --------------------------------------------------------------
: "${SIMULATE:=1}"                                   # jobs/simulate.py -> DATA_DIR
: "${TRAIN:=0}"                                      # jobs/train.py on DATA_DIR (one model, MODEL)
: "${TUNE:=1}"                                       # jobs/tune.py on DATA_DIR (ASHA + Optuna over MODEL)
: "${DRY_RUN:=0}"                                    # 1 = print the Ray nodes and step commands, start nothing

# ---- simulate ------------------------------------------------------------------------------------------------
: "${PRESET:=model_ii}"                              # simulation preset (deeplense_ray.sim.list_presets())
: "${NUM_PER_CLASS:=2000}"                           # images per class over all splits
: "${SHARD_SIZE:=4096}"                              # rows per HDF5 shard
: "${SEED:=0}"                                       # seed of the dataset and of the search
: "${SIM_WORKERS:=}"                                 # renderer actors ('' = simulate.py's default)
: "${GPUS_PER_WORKER:=}"                             # GPUs per renderer actor ('' = 1 if GPUs, else 0)
: "${SIMULATE_ARGS:=}"                               # extra flags, e.g. "--config my_preset.yaml"

# ---- train / tune ---------------------------------------------------------------------------------------------
: "${MODEL:=CvT}"                                    # model name (deeplense_ray.models.list_models())
: "${EPOCHS:=10}"                                    # train step: epochs
: "${TRAIN_WORKERS:=}"                               # train step: Ray Train workers ('' = one per GPU, or 1)
: "${TRAIN_GPUS_PER_WORKER:=}"                       # train step: GPUs per worker ('' = 1 with GPUs, else 0)
: "${TRAIN_ARGS:=}"                                  # train step: extra flags
: "${NUM_SAMPLES:=10}"                               # tune step: trials
: "${MAX_EPOCHS:=10}"                                # tune step: epochs per trial (ASHA max_t)
: "${GRACE_PERIOD:=}"                                # tune step: ASHA grace period ('' = tune.py's default)
: "${GPUS_PER_TRIAL:=}"                              # tune step: GPUs per trial worker, fractions pack trials
: "${CPUS_PER_TRIAL:=}"                              # tune step: CPUs per trial worker
: "${WORKERS_PER_TRIAL:=}"                           # tune step: Ray Train workers per trial
: "${MAX_CONCURRENT:=}"                              # tune step: concurrent trials ('' = what the cluster holds)
: "${TUNE_ARGS:=}"                                   # tune step: extra flags

# ---- Ray ------------------------------------------------------------------------------------------------------
: "${RAY_AUTH_MODE:=token}"                          # token (default) or disabled; always set explicitly
: "${DEEPLENSE_ALLOW_INSECURE_RAY:=0}"               # 1 = accept RAY_AUTH_MODE=disabled on a routable head
: "${RAY_AUTH_TOKEN_PATH:=$RUN_DIR/ray_auth_token}"  # per-job token, mode 600, made if missing (token mode)
# Ports: a block of 200 below the kernel's ephemeral range (32768 by default), the job id's block or, while one
# of its ports is in use on the head node, the next free one (deeplense_ray.runtime.pick_port_base); every node
# checks its ports before `ray start`. RAY_PORT_BASE pins the block (then a port in use stops the job).
: "${RAY_PORT_BASE:=}"                               # '' = chosen from SLURM_JOB_ID as above
: "${RAY_CLIENT_PORT:=}"                            # Ray client server port ('' = off; needs ray[client])
# RAY_PORT (GCS: the cluster address head-ip:RAY_PORT) = base, RAY_DASHBOARD_PORT (dashboard + job API, bound
# to 127.0.0.1: use SSH -L) = base+1, RAY_NODE_MANAGER_PORT +3, RAY_OBJECT_MANAGER_PORT +4, RAY_AGENT_GRPC_PORT
# +5, RAY_AGENT_LISTEN_PORT +6, RAY_METRICS_PORT +7, RAY_RUNTIME_ENV_AGENT_PORT +8, worker processes
# RAY_MIN_WORKER_PORT..RAY_MAX_WORKER_PORT = base+20..base+199 (each can be set on its own).
: "${RAY_TEMP_DIR:=/tmp/ray-${SLURM_JOB_ID:-local}}" # node-local Ray session dir (keep it short: unix sockets)
: "${RAY_HEAD_IP:=}"                                 # head address ('' = resolve the first node's name)
: "${RAY_NUM_CPUS:=}"                                # logical CPUs per Ray node ('' = the node's CPUs
                                                     # in the job, at least 4: a tune trial's driver,
                                                     # trainer and data reads must fit at once)
: "${RAY_NUM_GPUS:=}"                                # GPUs per Ray node ('' = from the allocation)
: "${RAY_START_TIMEOUT:=300}"                        # seconds to wait for all nodes to join
: "${RAY_STOP_TIMEOUT:=30}"                          # seconds to wait for Ray to stop before SIGKILL

export PROJECT_DIR VENV RUN_DIR DATA_DIR STORAGE_PATH MLFLOW_TRACKING_URI EXPERIMENT RAY_AUTH_MODE RAY_TEMP_DIR
export DEEPLENSE_ALLOW_INSECURE_RAY
export RAY_NUM_CPUS RAY_NUM_GPUS RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"
export RAY_ENABLE_UV_RUN_RUNTIME_ENV="${RAY_ENABLE_UV_RUN_RUNTIME_ENV:-0}" PYTHONUNBUFFERED=1

log() { printf '[%s jobscript] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { log "ERROR: $*" >&2; exit 1; }

# ---- checks before anything starts ---------------------------------------------------------------------------
[[ -n "${SLURM_JOB_ID:-}" ]] || die "not inside a SLURM job: submit with 'sbatch jobscript.sh'"
[[ -f "$PROJECT_DIR/jobs/simulate.py" ]] || die "PROJECT_DIR=$PROJECT_DIR has no jobs/simulate.py"
case "$RAY_AUTH_MODE" in token|disabled) ;; *) die "RAY_AUTH_MODE=$RAY_AUTH_MODE (use token or disabled)";; esac
for v in SIMULATE TRAIN TUNE DRY_RUN; do
    [[ "${!v}" == 0 || "${!v}" == 1 ]] || die "$v=${!v} (use 1 to run the step, 0 to skip it)"
done
if [[ -n "$VENV" ]]; then
    [[ -f "$VENV/bin/activate" ]] || die "VENV=$VENV is not a virtualenv (no bin/activate); set VENV= to use PATH"
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
fi
command -v ray >/dev/null || die "no 'ray' command on PATH (VENV=$VENV)"
ray_ports() {   # ray_ports pick JOB_ID | busy BASE: deeplense_ray.runtime's port block choice / ports in use here
    PYTHONPATH="$PROJECT_DIR${PYTHONPATH:+:$PYTHONPATH}" python -c '
import sys
from deeplense_ray.runtime import busy_ports, pick_port_base
what, n = sys.argv[1], int(sys.argv[2])
print(pick_port_base(n) if what == "pick" else " ".join(map(str, busy_ports(n))))' "$@"
}
if [[ -z "$RAY_PORT_BASE" ]]; then
    RAY_PORT_BASE="$(ray_ports pick "$SLURM_JOB_ID")" || die "no free block of Ray ports on $(hostname -s)"
else
    [[ "$RAY_PORT_BASE" =~ ^[0-9]+$ ]] || die "RAY_PORT_BASE=$RAY_PORT_BASE is not a port number"
    busy="$(ray_ports busy "$RAY_PORT_BASE")"
    [[ -z "$busy" ]] || die "RAY_PORT_BASE=$RAY_PORT_BASE: port(s) in use on $(hostname -s): $busy"
fi
: "${RAY_PORT:=$RAY_PORT_BASE}"
: "${RAY_DASHBOARD_PORT:=$((RAY_PORT_BASE + 1))}"
: "${RAY_NODE_MANAGER_PORT:=$((RAY_PORT_BASE + 3))}"
: "${RAY_OBJECT_MANAGER_PORT:=$((RAY_PORT_BASE + 4))}"
: "${RAY_AGENT_GRPC_PORT:=$((RAY_PORT_BASE + 5))}"
: "${RAY_AGENT_LISTEN_PORT:=$((RAY_PORT_BASE + 6))}"
: "${RAY_METRICS_PORT:=$((RAY_PORT_BASE + 7))}"
: "${RAY_RUNTIME_ENV_AGENT_PORT:=$((RAY_PORT_BASE + 8))}"
: "${RAY_MIN_WORKER_PORT:=$((RAY_PORT_BASE + 20))}"
: "${RAY_MAX_WORKER_PORT:=$((RAY_PORT_BASE + 199))}"
if [[ "$SIMULATE" == 0 && ! -f "$DATA_DIR/manifest.json" ]]; then
    die "SIMULATE=0 but DATA_DIR=$DATA_DIR has no manifest.json"
fi
mkdir -p "$RUN_DIR"
cd "$PROJECT_DIR"

if [[ "$RAY_AUTH_MODE" == token ]]; then
    if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then
        export RAY_AUTH_TOKEN
    else
        if [[ ! -s "$RAY_AUTH_TOKEN_PATH" ]]; then
            (umask 077 && python -c "import secrets; print(secrets.token_hex(32), end='')" \
                > "$RAY_AUTH_TOKEN_PATH.tmp" && mv "$RAY_AUTH_TOKEN_PATH.tmp" "$RAY_AUTH_TOKEN_PATH")
        fi
        export RAY_AUTH_TOKEN_PATH
    fi
fi

mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
HEAD_NODE="${NODES[0]}"
if [[ -z "$RAY_HEAD_IP" ]]; then
    # The batch script runs on the head node: its address as the other nodes resolve its name, else the
    # first address of its interfaces (Debian maps the host name to 127.0.1.1, useless to other nodes).
    RAY_HEAD_IP="$(getent ahostsv4 "$HEAD_NODE" | awk 'NR==1 {print $1}')"
    if [[ -z "$RAY_HEAD_IP" || "$RAY_HEAD_IP" == 127.* ]]; then
        RAY_HEAD_IP="$(hostname -I 2>/dev/null | awk '{print $1}')"
    fi
    [[ -n "$RAY_HEAD_IP" ]] || RAY_HEAD_IP=127.0.0.1
fi
if [[ "$RAY_AUTH_MODE" == disabled && "$RAY_HEAD_IP" != 127.* && "$DEEPLENSE_ALLOW_INSECURE_RAY" != 1 ]]; then
    die "RAY_AUTH_MODE=disabled with the Ray head on $RAY_HEAD_IP, a routable address: anyone who reaches it" \
        "could run code there. Use RAY_AUTH_MODE=token (the default), or set DEEPLENSE_ALLOW_INSECURE_RAY=1"
fi
export RAY_ADDRESS="$RAY_HEAD_IP:$RAY_PORT"

{   # provenance: every setting of this job, next to its results
    echo "# deeplense-ray jobscript settings, job $SLURM_JOB_ID on ${NODES[*]}, $(date -Is)"
    for v in PROJECT_DIR VENV RUN_DIR DATA_DIR STORAGE_PATH MLFLOW_TRACKING_URI EXPERIMENT SIMULATE TRAIN TUNE \
             PRESET NUM_PER_CLASS SHARD_SIZE SEED SIM_WORKERS GPUS_PER_WORKER SIMULATE_ARGS MODEL EPOCHS \
             TRAIN_WORKERS TRAIN_GPUS_PER_WORKER TRAIN_ARGS NUM_SAMPLES MAX_EPOCHS GRACE_PERIOD GPUS_PER_TRIAL CPUS_PER_TRIAL \
             WORKERS_PER_TRIAL MAX_CONCURRENT TUNE_ARGS RAY_AUTH_MODE RAY_ADDRESS RAY_PORT RAY_DASHBOARD_PORT \
             RAY_TEMP_DIR; do
        printf '%s=%q\n' "$v" "${!v}"
    done
} > "$RUN_DIR/job_settings.env"

# ---- one Ray node per SLURM node -----------------------------------------------------------------------------
node_gpus() {   # GPUs of this node in the job: RAY_NUM_GPUS, else the devices in CUDA_VISIBLE_DEVICES, else
                # SLURM_GPUS_ON_NODE, else 0
    if [[ -n "${RAY_NUM_GPUS:-}" ]]; then
        echo "$RAY_NUM_GPUS"
    elif [[ -n "${CUDA_VISIBLE_DEVICES:-}" && "${CUDA_VISIBLE_DEVICES}" != NoDevFiles ]]; then
        awk -F, '{print NF}' <<< "$CUDA_VISIBLE_DEVICES"
    else
        echo "${SLURM_GPUS_ON_NODE:-0}"
    fi
}
# Runs inside `srun` on each node: counts the node's CPUs and GPUs, runs `ray start --block` and passes it a
# SIGTERM on SIGTERM (scancel signals every process of the step) or SIGUSR1 (which srun forwards to its tasks;
# srun turns its own SIGTERM into SIGKILL), so Ray stops every process it started before the step ends.
ray_node() {
    local role="$1"
    local cpus="${RAY_NUM_CPUS:-}"
    if [[ -z "$cpus" ]]; then
        cpus="${SLURM_CPUS_ON_NODE:-$(nproc)}"
        [[ "$cpus" -ge 4 ]] || cpus=4
    fi
    local gpus
    gpus="$(node_gpus)"
    local common=(--num-cpus="$cpus" --num-gpus="$gpus" --block --disable-usage-stats
        --node-manager-port="$RAY_NODE_MANAGER_PORT" --object-manager-port="$RAY_OBJECT_MANAGER_PORT"
        --dashboard-agent-grpc-port="$RAY_AGENT_GRPC_PORT" --dashboard-agent-listen-port="$RAY_AGENT_LISTEN_PORT"
        --metrics-export-port="$RAY_METRICS_PORT" --runtime-env-agent-port="$RAY_RUNTIME_ENV_AGENT_PORT"
        --min-worker-port="$RAY_MIN_WORKER_PORT" --max-worker-port="$RAY_MAX_WORKER_PORT")
    echo "[ray_node] $role on $(hostname -s): cpus=$cpus gpus=$gpus"
    local busy
    busy="$(ray_ports busy "$RAY_PORT_BASE")"
    if [[ -n "$busy" ]]; then
        echo "[ray_node] ERROR: Ray port(s) in use on $(hostname -s): $busy (set RAY_PORT_BASE)" >&2
        return 1
    fi
    # Ray Train's controller polls its workers every 0.25 s, not 2 s: a run's end is noticed ~5 s sooner
    export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="${RAY_TRAIN_HEALTH_CHECK_INTERVAL_S:-0.25}"
    if [[ "$role" == head ]]; then
        ray start --head --node-ip-address="$RAY_HEAD_IP" --port="$RAY_PORT" --temp-dir="$RAY_TEMP_DIR" \
            --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$RAY_DASHBOARD_PORT" \
            ${RAY_CLIENT_PORT:+--ray-client-server-port="$RAY_CLIENT_PORT"} "${common[@]}" &
    else
        ray start --address="$RAY_ADDRESS" "${common[@]}" &
    fi
    local pid=$! stopping=0
    trap 'stopping=1; kill -TERM "$pid" 2>/dev/null' TERM USR1 INT
    local rc=0
    wait "$pid" || rc=$?
    if [[ $stopping == 1 ]]; then rc=0; wait "$pid" 2>/dev/null || true; fi   # woken by the trap: let Ray stop
    echo "[ray_node] $role on $(hostname -s) $([[ $stopping == 1 ]] && echo stopped || echo "exited ($rc)")"
    return "$rc"
}
export -f ray_node node_gpus ray_ports
export RAY_HEAD_IP RAY_PORT_BASE RAY_PORT RAY_DASHBOARD_PORT RAY_CLIENT_PORT RAY_NODE_MANAGER_PORT RAY_OBJECT_MANAGER_PORT
export RAY_AGENT_GRPC_PORT RAY_AGENT_LISTEN_PORT RAY_METRICS_PORT RAY_RUNTIME_ENV_AGENT_PORT
export RAY_MIN_WORKER_PORT RAY_MAX_WORKER_PORT

RAY_PIDS=()
DRIVER_PID=""
STOPPED=0
stop_ray() {
    local status=$?
    [[ "$STOPPED" == 1 ]] && return
    STOPPED=1
    trap - EXIT INT TERM
    set +e
    if [[ -n "$DRIVER_PID" ]] && kill -0 "$DRIVER_PID" 2>/dev/null; then
        log "stopping the running step (pid $DRIVER_PID)"
        kill -TERM "$DRIVER_PID" 2>/dev/null
        local waited=0
        while kill -0 "$DRIVER_PID" 2>/dev/null && [[ $waited -lt 10 ]]; do sleep 1; waited=$((waited + 1)); done
        kill -KILL "$DRIVER_PID" 2>/dev/null
        wait "$DRIVER_PID" 2>/dev/null
    fi
    if [[ ${#RAY_PIDS[@]} -gt 0 ]]; then
        log "stopping Ray on ${#RAY_PIDS[@]} node(s)"
        # Workers first, then the head: SIGUSR1 to each srun, forwarded to ray_node, which stops Ray gracefully.
        for ((i = ${#RAY_PIDS[@]} - 1; i >= 0; i--)); do kill -USR1 "${RAY_PIDS[$i]}" 2>/dev/null; done
        local waited=0
        while [[ $waited -lt $RAY_STOP_TIMEOUT ]]; do
            local alive=0
            for p in "${RAY_PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
            [[ $alive == 0 ]] && break
            sleep 1; waited=$((waited + 1))
        done
        for p in "${RAY_PIDS[@]}"; do kill -0 "$p" 2>/dev/null && kill -TERM "$p" 2>/dev/null; done  # srun: KILL
        wait 2>/dev/null
        log "Ray stopped"
    fi
    exit "$status"
}
trap stop_ray EXIT
trap 'log "signal received"; exit 143' INT TERM

# CPUs each node's step may use: SLURM_CPUS_PER_TASK if given, else the job's CPUs on that node, from
# SLURM_JOB_CPUS_PER_NODE ("32(x2),16" -> 32 32 16), so task/cgroup confines Ray to what SLURM gave it.
CPN=()
IFS=',' read -ra _cpn_parts <<< "${SLURM_JOB_CPUS_PER_NODE:-}"
for part in "${_cpn_parts[@]}"; do
    if [[ "$part" =~ ^([0-9]+)\(x([0-9]+)\)$ ]]; then
        for ((i = 0; i < BASH_REMATCH[2]; i++)); do CPN+=("${BASH_REMATCH[1]}"); done
    elif [[ "$part" =~ ^[0-9]+$ ]]; then
        CPN+=("$part")
    fi
done
node_srun() {   # node_srun <index> <role>: one long-running step holding the whole node's share of the job
    local cpus="${SLURM_CPUS_PER_TASK:-${CPN[$1]:-1}}"
    srun --nodes=1 --ntasks=1 --overlap --kill-on-bad-exit=0 --mem=0 --cpus-per-task="$cpus" \
        --nodelist="${NODES[$1]}" bash -c "ray_node $2" &
    RAY_PIDS+=($!)
}
# ---- the step commands (built before Ray starts; DRY_RUN=1 prints them and stops here) ----------------------
opt() { [[ -n "$2" ]] && printf '%s\n%s\n' "$1" "$2"; return 0; }   # "--flag value" only when value is set
# The allocation's GPUs: this node's (node_gpus) on every node of the job. The train step takes them all,
# TRAIN_GPUS_PER_WORKER (default 1) per worker; simulate and tune see them in the Ray cluster.
TOTAL_GPUS=$(awk -v g="$(node_gpus)" -v n="${#NODES[@]}" 'BEGIN {print g * n}')
if [[ -z "$TRAIN_GPUS_PER_WORKER" ]]; then
    TRAIN_GPUS_PER_WORKER=$(awk -v t="$TOTAL_GPUS" 'BEGIN {print (t > 0) ? 1 : 0}')
fi
if [[ -z "$TRAIN_WORKERS" ]]; then
    TRAIN_WORKERS=$(awk -v t="$TOTAL_GPUS" -v g="$TRAIN_GPUS_PER_WORKER" \
        'BEGIN {w = (g > 0) ? int(t / g + 1e-9) : 1; print (w > 0) ? w : 1}')
fi
mapfile -t sim_opts < <(opt --workers "$SIM_WORKERS"; opt --gpus-per-worker "$GPUS_PER_WORKER")
# A requeued or restarted job finishes the dataset it started (same settings) instead of refusing it.
resume=(); [[ -d "$DATA_DIR" && -n "$(ls -A "$DATA_DIR" 2>/dev/null)" ]] && resume=(--resume)
# shellcheck disable=SC2206
SIMULATE_CMD=(python -u jobs/simulate.py --address "$RAY_ADDRESS" --preset "$PRESET"
    --num-per-class "$NUM_PER_CLASS" --shard-size "$SHARD_SIZE" --seed "$SEED" --out "$DATA_DIR"
    "${resume[@]}" "${sim_opts[@]}" $SIMULATE_ARGS)
# shellcheck disable=SC2206
TRAIN_CMD=(python -u jobs/train.py --address "$RAY_ADDRESS" --model "$MODEL" --data "$DATA_DIR"
    --epochs "$EPOCHS" --seed "$SEED" --experiment "$EXPERIMENT" --tracking-uri "$MLFLOW_TRACKING_URI"
    --storage-path "$STORAGE_PATH" --num-workers "$TRAIN_WORKERS" --gpus-per-worker "$TRAIN_GPUS_PER_WORKER"
    $TRAIN_ARGS)
mapfile -t tune_opts < <(opt --grace-period "$GRACE_PERIOD"; opt --gpus-per-trial "$GPUS_PER_TRIAL"
    opt --cpus-per-trial "$CPUS_PER_TRIAL"; opt --workers-per-trial "$WORKERS_PER_TRIAL"
    opt --max-concurrent "$MAX_CONCURRENT")
# shellcheck disable=SC2206
TUNE_CMD=(python -u jobs/tune.py --address "$RAY_ADDRESS" --model "$MODEL" --data "$DATA_DIR"
    --num-samples "$NUM_SAMPLES" --max-epochs "$MAX_EPOCHS" --seed "$SEED" --experiment "$EXPERIMENT"
    --tracking-uri "$MLFLOW_TRACKING_URI" --storage-path "$STORAGE_PATH" "${tune_opts[@]}" $TUNE_ARGS)
if [[ "$DRY_RUN" == 1 ]]; then
    for ((n = 0; n < ${#NODES[@]}; n++)); do
        log "dry run: Ray $([[ $n == 0 ]] && echo head || echo worker) on ${NODES[$n]}: gpus=$(node_gpus)"
    done
    log "dry run: Ray ports $RAY_PORT_BASE..$((RAY_PORT_BASE + 199)) (GCS $RAY_PORT, dashboard $RAY_DASHBOARD_PORT)"
    if [[ "$SIMULATE" == 1 ]]; then log "dry run: step simulate: $(printf '%q ' "${SIMULATE_CMD[@]}")"; fi
    if [[ "$TRAIN" == 1 ]]; then log "dry run: step train: $(printf '%q ' "${TRAIN_CMD[@]}")"; fi
    if [[ "$TUNE" == 1 ]]; then log "dry run: step tune: $(printf '%q ' "${TUNE_CMD[@]}")"; fi
    log "dry run: nothing started"
    exit 0
fi

log "job $SLURM_JOB_ID: ${#NODES[@]} node(s) ${NODES[*]}; head $HEAD_NODE at $RAY_ADDRESS (auth $RAY_AUTH_MODE)"
log "results in $RUN_DIR"
node_srun 0 head

# Wait for the head, then join the workers and wait until every node is alive.
wait_nodes() {   # exec: the background job's pid is python itself, so the trap can stop it
    exec python - "$1" "$RAY_START_TIMEOUT" <<'PY'
import os, sys, time
want, timeout = int(sys.argv[1]), float(sys.argv[2])
deadline = time.monotonic() + timeout
import ray
while True:
    try:
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False, logging_level="ERROR")
        break
    except Exception as exc:  # head not up yet
        if time.monotonic() > deadline:
            sys.exit(f"Ray head at {os.environ['RAY_ADDRESS']} not reachable after {timeout:.0f} s: {exc}")
        time.sleep(2)
while True:
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) >= want:
        res = ray.cluster_resources()
        print(f"Ray cluster up: {len(alive)} node(s), {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs")
        break
    if time.monotonic() > deadline:
        sys.exit(f"only {len(alive)} of {want} Ray nodes joined after {timeout:.0f} s")
    time.sleep(2)
PY
}
check_ray_alive() {
    for p in "${RAY_PIDS[@]}"; do kill -0 "$p" 2>/dev/null || die "a Ray node exited early (srun pid $p)"; done
}
await_nodes() {   # wait_nodes in the background while checking that no Ray node died meanwhile
    wait_nodes "$1" &
    DRIVER_PID=$!
    while kill -0 "$DRIVER_PID" 2>/dev/null; do check_ray_alive; sleep 1; done
    wait "$DRIVER_PID" || die "$2"
    DRIVER_PID=""
}
await_nodes 1 "the Ray head did not start (see above)"
for ((n = 1; n < ${#NODES[@]}; n++)); do node_srun "$n" worker; done
[[ ${#NODES[@]} -eq 1 ]] || await_nodes "${#NODES[@]}" "not every node joined the Ray cluster"

# ---- the steps -------------------------------------------------------------------------------------------------
# Each step runs in the background and is waited for, so that a signal runs the trap at once.
run_step() {
    local name="$1"; shift
    check_ray_alive
    log "step $name: $*"
    "$@" &
    DRIVER_PID=$!
    local rc=0
    wait "$DRIVER_PID" || rc=$?
    DRIVER_PID=""
    [[ $rc == 0 ]] || die "step $name failed with status $rc"
    log "step $name done"
}
if [[ "$SIMULATE" == 1 ]]; then run_step simulate "${SIMULATE_CMD[@]}"; fi
if [[ "$TRAIN" == 1 ]]; then run_step train "${TRAIN_CMD[@]}"; fi
if [[ "$TUNE" == 1 ]]; then run_step tune "${TUNE_CMD[@]}"; fi

log "all steps done; results in $RUN_DIR"
log "dataset: $DATA_DIR   MLflow: $MLFLOW_TRACKING_URI (experiment $EXPERIMENT)"
if [[ "$MLFLOW_TRACKING_URI" == sqlite:* ]]; then
    log "MLflow UI: mlflow ui --backend-store-uri $MLFLOW_TRACKING_URI --port 5000, then open http://127.0.0.1:5000"
fi
