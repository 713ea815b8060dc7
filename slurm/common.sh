# Shared by the sbatch wrappers in this directory (sourced, never submitted). Bash only.
#
# Every wrapper follows the same order:
#   1. srpo_check_env    refuse (exit 2, naming the variable) when required configuration is
#                        missing: before anything expensive, and before submission;
#   2. srpo_submit_self  outside an allocation (no SLURM_JOB_ID): create ./logs and submit the
#                        wrapper itself with sbatch (SLURM does not create the --output directory:
#                        a job whose log directory is missing fails with JobLaunchFailure 0:53);
#   3. srpo_setup_env    inside the allocation: cd to the repository, activate its virtualenv,
#                        point Metaflow at the datastore, thread counts;
#   4. srpo_launch       run $SRPO_CMD (default: the Metaflow flow, local runtime) with its arguments.
#
# Variables (all optional unless marked):
#   SRPO_ARTIFACT_ROOT (required)   artifact store root: a directory or s3://bucket/prefix
#   MLFLOW_TRACKING_URI (required)  MLflow tracking server, e.g. http://mlflow.internal:5000
#   METAFLOW_DATASTORE_SYSROOT_S3   Metaflow S3 datastore root (required when the datastore is s3)
#   METAFLOW_DEFAULT_DATASTORE      s3 | local; default: s3 when METAFLOW_DATASTORE_SYSROOT_S3 is set
#                                   or SRPO_ARTIFACT_ROOT is s3://..., else local
#   SRPO_S3_ENDPOINT_URL            S3-compatible endpoint (MinIO, Ceph); also given to Metaflow
#                                   (METAFLOW_S3_ENDPOINT_URL) and MLflow (MLFLOW_S3_ENDPOINT_URL)
#   SRPO_CMD                        the launched program, default "python flows/srpo_flow.py"; the
#                                   wrapper appends "run --training-id ID [...] $@" (--set merged)
#   SRPO_CONFIG                     the flow's configuration: a preset name (tiny, paper, paper_olmo)
#                                   or a YAML file (default in these wrappers: paper)
#   SRPO_TRAINING_ID                --training-id (default: derived from the SLURM job id); the same
#                                   id again resumes that training from its last finished step
#   SRPO_REPO                       the repository checkout (default: the submit directory)
#   SRPO_VENV                       a virtualenv to activate (default: $SRPO_REPO/.venv if present
#                                   and no virtualenv is active)
#   SRPO_SBATCH_ARGS                extra sbatch options when a wrapper submits itself
#   SRPO_DRY_RUN=1                  print what would be submitted / launched, run nothing

srpo_die() {  # srpo_die CODE MESSAGE...
    local code=$1
    shift
    echo "${SRPO_WRAPPER:-srpo}: $*" >&2
    exit "$code"
}

srpo_require() {  # srpo_require VAR "what it is" [VAR "what" ...]: exit 2 naming the first missing one
    while [ $# -gt 0 ]; do
        if [ -z "${!1:-}" ]; then
            srpo_die 2 "required variable $1 is not set: $2. Export it before submitting (sbatch passes the environment through)."
        fi
        shift 2
    done
}

srpo_check_env() {  # the configuration every wrapper needs; cheap, no side effects
    srpo_require \
        SRPO_ARTIFACT_ROOT "the artifact store root, a directory or s3://bucket/prefix" \
        MLFLOW_TRACKING_URI "the MLflow tracking server, e.g. http://mlflow.internal:5000"
    if [ -z "${METAFLOW_DEFAULT_DATASTORE:-}" ]; then
        if [ -n "${METAFLOW_DATASTORE_SYSROOT_S3:-}" ] || [[ "$SRPO_ARTIFACT_ROOT" == s3://* ]]; then
            export METAFLOW_DEFAULT_DATASTORE=s3
        else
            export METAFLOW_DEFAULT_DATASTORE=local
        fi
    fi
    if [ "$METAFLOW_DEFAULT_DATASTORE" = s3 ]; then
        srpo_require METAFLOW_DATASTORE_SYSROOT_S3 "the Metaflow S3 datastore root, e.g. s3://bucket/metaflow (the datastore is s3)"
    fi
    if [ -n "${SRPO_CMD+set}" ] && [ -z "$SRPO_CMD" ]; then
        srpo_die 2 "SRPO_CMD is set but empty; unset it to run the flow (python flows/srpo_flow.py)"
    fi
}

srpo_split() {  # srpo_split ARRAY_NAME "words 'with quotes'": shell-style word splitting, no expansion
    local -n _out=$1
    _out=()
    [ -n "$2" ] || return 0
    local line
    while IFS= read -r -d '' line; do _out+=("$line"); done < <(xargs -r printf '%s\0' <<<"$2")
}

srpo_show() {  # print a command line, shell-quoted, prefixed with "+ "
    local out="+" word
    for word in "$@"; do out+=" $(printf '%q' "$word")"; done
    echo "$out"
}

srpo_submit_self() {  # srpo_submit_self SCRIPT [SBATCH_OPTION ...] -- [ARG ...]
    [ -z "${SLURM_JOB_ID:-}" ] || return 0  # already inside an allocation (sbatch, salloc): go on
    local script=$1
    shift
    local -a opts=() extra=()
    while [ $# -gt 0 ] && [ "$1" != -- ]; do opts+=("$1"); shift; done
    [ "${1:-}" = -- ] && shift
    srpo_split extra "${SRPO_SBATCH_ARGS:-}"
    export SRPO_REPO
    if [ "${SRPO_DRY_RUN:-0}" = 1 ]; then
        srpo_show sbatch "${opts[@]}" "${extra[@]}" "$script" "$@"
        exit 0
    fi
    command -v sbatch >/dev/null || srpo_die 2 "not inside a SLURM allocation (SLURM_JOB_ID is not set) and no sbatch on PATH"
    mkdir -p logs  # the #SBATCH --output directory, relative to the submit directory
    exec sbatch "${opts[@]}" "${extra[@]}" "$script" "$@"
}

srpo_setup_env() {
    # the job's own directory (sbatch --chdir, else the submit directory): where #SBATCH --output
    # put the job log, so the wrappers' other logs (inference server) go next to it
    export SRPO_LOG_DIR="${SRPO_LOG_DIR:-$PWD/logs}"
    export SRPO_CONFIG="${SRPO_CONFIG:-paper}"   # read by the flow (a preset name or a YAML file)
    mkdir -p "$SRPO_LOG_DIR"
    cd "$SRPO_REPO" || srpo_die 2 "SRPO_REPO=$SRPO_REPO: cannot change into the repository"
    if [ -n "${SRPO_VENV:-}" ]; then
        [ -f "$SRPO_VENV/bin/activate" ] || srpo_die 2 "SRPO_VENV=$SRPO_VENV has no bin/activate"
        # shellcheck disable=SC1091
        . "$SRPO_VENV/bin/activate"
    elif [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
        # shellcheck disable=SC1091
        . .venv/bin/activate
    fi
    export USERNAME="${USERNAME:-${USER:-$(id -un)}}"  # Metaflow refuses to run as root without it
    export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
    if [ -n "${SRPO_S3_ENDPOINT_URL:-}" ]; then
        export METAFLOW_S3_ENDPOINT_URL="${METAFLOW_S3_ENDPOINT_URL:-$SRPO_S3_ENDPOINT_URL}"
        export MLFLOW_S3_ENDPOINT_URL="${MLFLOW_S3_ENDPOINT_URL:-$SRPO_S3_ENDPOINT_URL}"
    fi
}

srpo_banner() {  # one line for the job log: where it runs and with what
    echo "${SRPO_WRAPPER:-srpo}: job ${SLURM_JOB_ID:-?}${SLURM_ARRAY_TASK_ID:+ task $SLURM_ARRAY_TASK_ID} on ${SLURMD_NODENAME:-$(hostname)}" \
        "gpus=${SLURM_GPUS_ON_NODE:-0}${CUDA_VISIBLE_DEVICES:+ (CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES)}" \
        "datastore=$METAFLOW_DEFAULT_DATASTORE artifacts=$SRPO_ARTIFACT_ROOT mlflow=$MLFLOW_TRACKING_URI $*"
}

srpo_merge_sets() {  # srpo_merge_sets ARRAY_NAME [PAIR ...] -- ARG...
    # ARG... with every "--set VALUE" / "--set=VALUE" (the flow's overrides: a space-separated
    # key=value string) merged, PAIR... appended, into one trailing --set: the flow's --set is a
    # single option, given twice only the last would count. The merged string: $srpo_sets_joined.
    local -n _dst=$1
    shift
    local -a _extra=() _sets=()
    while [ $# -gt 0 ] && [ "$1" != -- ]; do _extra+=("$1"); shift; done
    [ "${1:-}" = -- ] && shift
    _dst=()
    while [ $# -gt 0 ]; do
        case "$1" in
            --set) [ $# -ge 2 ] || srpo_die 2 "--set needs a value (key=value ...)"; _sets+=("$2"); shift 2 ;;
            --set=*) _sets+=("${1#--set=}"); shift ;;
            *) _dst+=("$1"); shift ;;
        esac
    done
    _sets+=("${_extra[@]}")
    srpo_sets_joined="${_sets[*]}"
    if [ ${#_sets[@]} -gt 0 ]; then _dst+=(--set "$srpo_sets_joined"); fi
}

srpo_launch() {  # srpo_launch ARG...: $SRPO_CMD ARG..., echoed first; SRPO_DRY_RUN=1 only echoes
    local -a cmd
    srpo_split cmd "${SRPO_CMD:-python flows/srpo_flow.py}"
    srpo_show "${cmd[@]}" "$@"
    [ "${SRPO_DRY_RUN:-0}" = 1 ] && return 0
    "${cmd[@]}" "$@"
}
