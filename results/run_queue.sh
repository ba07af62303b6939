#!/usr/bin/env bash
# The evidence queue: every training job of the converged protocol, one at a time, each resumable
# (finished runs are skipped) and committed as soon as it finishes, so the tables grow job by job
# however often the queue is interrupted. Run it in the background, niced:
#
#   CODE=/path/to/frozen/checkout nice -n 19 bash results/run_queue.sh [FIRST_JOB_NUMBER]
#
# CODE (default: this checkout) is the tree whose code trains (a frozen `git worktree` keeps the
# runs' code fixed while the checkout changes); results and commits go to this checkout.
# Every job appends one line to results/queue_log.tsv: job, exit status, wall seconds, the
# 1-minute load before and after. QUEUE_NO_COMMIT=1 skips the commits. Where to restart after an
# interruption: `QUEUE_STATUS=1 bash results/run_queue.sh` (finished jobs are skipped anyway).
set -u
HERE="$(cd "$(dirname "$0")/.." && pwd)"
CODE="${CODE:-$HERE}"
LOG="$HERE/results/queue_log.tsv"
START="${1:-1}"

# Budgets, chosen from the validation curves of equal weighting trained far longer (the budget
# probes, results/budget_probe/*; docs/budgets.md): QM9 100 epochs of 216 steps, evaluated every
# epoch, plateau patience 5 (at 60 epochs EW was still 0.8-3.9 % above its best; every seed
# flattened within 1 % at epochs 60-86); MultiFashion 40 epochs of 93 steps (the probe's first seed:
# still 2.8 % below its best at 20 epochs; within about 1 %, the noise of a 4,000-pair validation
# accuracy, from epoch 30 on; MF_EPOCHS overrides). The probes' schedule is the protocol's.
QM9="qm9 --seeds 0 1 2 3 4 --single-task-seeds 0 1 2 3 4 --epochs 100 --batch-size 512 --eval-every 216 \
 --schedule plateau --plateau-patience 5 --resume --no-tensorboard --no-plots --quiet --out $HERE/results/qm9_converged"
MF="multifashion --seeds 0 1 2 3 4 --epochs ${MF_EPOCHS:-40} --batch-size 256 --eval-every 93 --schedule plateau \
 --plateau-patience 5 --resume --no-tensorboard --no-plots --quiet --out $HERE/results/multifashion_converged"
# The tuned tables' single-task test runs at the default rate are the converged tables' runs (the
# same configuration and seeds; a single-task run's selection needs no reference): copied, not retrained.
GRID="--lr-grid 5e-3 1e-3 5e-4 1e-4 --wd-grid 0 --tune-seeds 100"
QM9_TUNE="tuning --benchmark qm9 --seeds 0 1 2 3 4 --epochs 100 --batch-size 512 --eval-every 216 --schedule plateau \
 --plateau-patience 5 $GRID --no-tensorboard --no-plots --quiet --out $HERE/results/qm9_tuned \
 --reuse-single-task $HERE/results/qm9_converged"
MF_TUNE="tuning --benchmark multifashion --seeds 0 1 2 3 4 --epochs ${MF_EPOCHS:-40} --batch-size 256 --eval-every 93 \
 --schedule plateau --plateau-patience 5 $GRID --no-tensorboard --no-plots --quiet --out $HERE/results/multifashion_tuned \
 --reuse-single-task $HERE/results/multifashion_converged"
PROBE="--methods equal --seeds 0 1 2 3 4 --schedule plateau --plateau-patience 5 --resume --no-tensorboard --no-plots --quiet"

# Representation level unless the name says otherwise (MoCo is defined at the parameter level
# only); IMTL-L and uncertainty are one method under Adam (mirror trajectories; the tables merge
# them) and are run both only to show it.
METHODS_Z="equal rlw si imtl_h imtl_g imtl_l uncertainty gls famo dwa mgda pcgrad cagrad nash_mtl aligned_mtl upgrad
 gradnorm gradnorm_gamma0 mgda_closed_form imtl_g_averaged config dualproj db_mtl stch gradvac fairgrad sdmgrad
 modo cr_mogm pbi cosmos excess_mtl graddrop"
PARAMS_MF="imtl_g_exact nash_mtl@params mgda@params pcgrad@params cagrad@params aligned_mtl@params upgrad@params
 config@params dualproj@params gradvac@params excess_mtl@params moco@params"
# The order puts what decides the headline question first: on each benchmark the single-task
# networks, EW, the skeptics' baselines (RLW, SI) and IMTL at both levels, then the tuning of those
# (the tuned tables decide), then every other method, the diagnosis and the studies.
CORE="equal rlw si imtl_h imtl_g imtl_l uncertainty"
REST_Z=""
for m in $METHODS_Z; do case " $CORE " in *" $m "*) ;; *) REST_Z="$REST_Z $m" ;; esac; done
JOBS=()
# The budget probes first (MultiFashion: 3 seeds, LeNet seeds train one after another on a CPU).
JOBS+=("multifashion ${PROBE/--seeds 0 1 2 3 4/--seeds 0 1 2} --epochs 40 --batch-size 256 --eval-every 93 \
 --out $HERE/results/budget_probe/multifashion")
JOBS+=("qm9 $PROBE --epochs 100 --batch-size 512 --eval-every 216 --out $HERE/results/budget_probe/qm9")
JOBS+=("$QM9 --methods single_task")
for m in $CORE imtl_g_exact; do JOBS+=("$QM9 --methods single_task $m"); done
# A QM9 method (5 seeds vmapped into one program) takes ~7 minutes on this machine, a MultiFashion
# one (LeNet seeds one after another) 30-80: the skeptics' baselines on MultiFashion come first,
# then everything QM9 needs for its decisive tables (tuning, every other method, the diagnosis),
# then the rest of MultiFashion.
MF_SKEPTICS="rlw si"
JOBS+=("$MF --methods single_task")
for m in equal $MF_SKEPTICS; do JOBS+=("$MF --methods single_task $m"); done
# Tuning parity: the same grid and tuning seed for every tuned method (one call per method so
# that each finishes and is committed alone; the last call, all finished, writes the joint table).
# The two best other methods of each untuned table (lowest mean validation Δm%; methods identical to a
# tuned one do not count) are tuned once every method of that table has run (--add-best-untuned):
# the first, then the second with the whole family (that last call writes the joint tuned table).
TUNED="equal imtl_h imtl_g imtl_g_exact si rlw"
for m in $TUNED; do JOBS+=("$QM9_TUNE --methods single_task $m"); done
JOBS+=("$QM9_TUNE --methods single_task $TUNED")
# Why the representation level trails on QM9 (right after QM9's tuning: it is the issue's own question): IMTL-G at z and at theta, and the alpha-averaging
# remedy, 3 seeds, with the z-vs-theta probes (cosine-matrix eigenvalues, gradient-norm spread).
JOBS+=("ablation_z_vs_theta --benchmark qm9 --methods imtl_g imtl_g_exact imtl_g_averaged --seeds 0 1 2 \
 --epochs 100 --batch-size 512 --eval-every 216 --schedule plateau --plateau-patience 5 --probe-every 432 --resume \
 --no-tensorboard --quiet --out $HERE/results/z_diagnosis_qm9")
# ... and the remedy that keeps EW's cost (alpha averaged over steps) with 5 seeds beside the others.
JOBS+=("$QM9 --methods single_task imtl_g_averaged")
for m in $CORE imtl_g_exact; do
  case " equal $MF_SKEPTICS " in *" $m "*) ;; *) JOBS+=("$MF --methods single_task $m") ;; esac
done
# Every other method, untuned, on QM9 (alpha averaged over steps ran beside the diagnosis).
for m in $REST_Z nash_mtl@params; do [ "$m" = imtl_g_averaged ] || JOBS+=("$QM9 --methods single_task $m"); done
for n in 1 2; do JOBS+=("$QM9_TUNE --methods single_task $TUNED --add-best-untuned $HERE/results/qm9_converged $n"); done
for m in $TUNED; do JOBS+=("$MF_TUNE --methods single_task $m"); done
JOBS+=("$MF_TUNE --methods single_task $TUNED")
for m in $REST_Z; do JOBS+=("$MF --methods single_task $m"); done
for m in $PARAMS_MF; do [ "$m" = imtl_g_exact ] || JOBS+=("$MF --methods single_task $m"); done
for n in 1 2; do
  JOBS+=("$MF_TUNE --methods single_task $TUNED --add-best-untuned $HERE/results/multifashion_converged $n")
done
# The studies run earlier at one seed, under this protocol with 3 seeds (MultiFashion budget):
# the static-scalarization sweep w in {0.1, ..., 0.9} (ratios w/(1-w), beside IMTL-H with the same
# priorities), the x10 loss-rescale robustness test and the z-vs-theta ablation.
MF_STUDY="--benchmark multifashion --seeds 0 1 2 --epochs ${MF_EPOCHS:-40} --batch-size 256 --eval-every 93 \
 --schedule plateau --plateau-patience 5 --resume --no-tensorboard --quiet"
JOBS+=("priorities $MF_STUDY --ratios 1/9 1/4 3/7 2/3 1 3/2 7/3 4 9 --out $HERE/results/scalarization_sweep")
JOBS+=("robustness $MF_STUDY --methods equal imtl_l imtl_g imtl_h rlw si --out $HERE/results/robustness")
JOBS+=("ablation_z_vs_theta $MF_STUDY --out $HERE/results/ablation_z_vs_theta")
# QUEUE_LIST=1 prints the job list and exits (to check an edit of it); QUEUE_STATUS=1 prints each
# job as "done" (the log holds its exact command with exit status 0) or "todo", and the first todo
# job's number, the one to restart at.
if [ "${QUEUE_LIST:-0}" = 1 ]; then n=0; for j in "${JOBS[@]}"; do n=$((n+1)); echo "$n ${j//$HERE\//}"; done; exit 0; fi
if [ "${QUEUE_STATUS:-0}" = 1 ]; then
  n=0; first=""
  for j in "${JOBS[@]}"; do
    n=$((n+1)); cmd="python -m experiments ${j//$HERE\//}"
    if [ -f "$LOG" ] && awk -F'\t' -v c="$cmd" '$2 == "0" && $7 == c {found=1} END {exit !found}' "$LOG"; then
      state=done
    else
      state=todo; first="${first:-$n}"
    fi
    echo "$n $state ${j//$HERE\//}"
  done
  echo "first job to run: ${first:-none (all done)}"; exit 0
fi

commit() {  # commit only the results of this queue (retry while another git command holds the index)
  [ "${QUEUE_NO_COMMIT:-0}" = 1 ] && return 0
  local msg="$1"; shift
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    if (cd "$HERE" && git add -- "$@" 2>/dev/null && git commit -q -m "$msg" -- "$@" >/dev/null 2>&1); then return 0; fi
    sleep 15
  done
  echo "run_queue: could not commit $msg" >&2
}

# The interpreter: PYTHON, else this checkout's .venv, else python on PATH. A queue that cannot even
# import the library stops here rather than logging (and committing) 80 failed jobs in a minute.
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$HERE/.venv/bin/python" ]; then PYTHON="$HERE/.venv/bin/python"; else PYTHON=python; fi
fi
if ! (cd "$CODE" && "$PYTHON" -c "import jax, imtl_jax, experiments.suites") >/dev/null 2>&1; then
  echo "run_queue: $PYTHON cannot import jax/imtl_jax/experiments from $CODE; activate the environment or set PYTHON" >&2
  exit 2
fi

DOCS="README.md docs/does_imtl_help.md docs/results.md docs/budgets.md docs/performance.md"
[ -f "$LOG" ] || printf "job\tstatus\twall_s\tload_before\tload_after\tended\tcommand\n" > "$LOG"
n=0
for job in "${JOBS[@]}"; do
  n=$((n + 1))
  [ "$n" -lt "$START" ] && continue
  out=$(echo "$job" | sed -n 's/.*--out \([^ ]*\).*/\1/p')
  folder="${out#$HERE/}"
  # The folder's uncommitted changes before the job (someone's edit, a regenerated plot): a skipped
  # job restores its folder only when there were none, so it never discards another's work.
  dirty_before=$(cd "$HERE" && git status --porcelain --untracked-files=all -- "${folder:-.}" 2>/dev/null)
  before=$(cut -d' ' -f1 /proc/loadavg); t0=$(date +%s)
  echo "run_queue: job $n/${#JOBS[@]}: python -m experiments $job"
  (cd "$CODE" && "$PYTHON" -m experiments $job)
  status=$?
  after=$(cut -d' ' -f1 /proc/loadavg); t1=$(date +%s)
  # A job whose runs had all finished earlier (a restart skipping them) changed no run's record, only
  # rewrote the folder's summary for its own --methods: restore the summary, log and commit nothing.
  if [ "$status" = 0 ] && [ -n "$folder" ] && [ -z "$dirty_before" ] && [ -d "$HERE/$folder/runs" ] && (cd "$HERE" &&
      [ -z "$(git status --porcelain --untracked-files=all -- "$folder/runs" 2>/dev/null)" ]); then
    (cd "$HERE" && git checkout -q -- "$folder" 2>/dev/null) || true
    echo "run_queue: job $n: every run finished earlier; nothing new"
    continue
  fi
  printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\n" "$n" "$status" "$((t1 - t0))" "$before" "$after" "$(date -u +%FT%TZ)" \
    "python -m experiments ${job//$HERE\//}" >> "$LOG"
  (cd "$CODE" && "$PYTHON" -m experiments.curves "$out" >/dev/null 2>&1) || true
  # The docs' table blocks follow the results in the same commit (else the committed tables go stale
  # and the test that checks them fails on main); a docs file with someone's uncommitted edits is
  # regenerated but left for them to commit.
  clean=()
  for f in $DOCS; do
    [ -f "$HERE/$f" ] && (cd "$HERE" && git diff --quiet HEAD -- "$f" 2>/dev/null) && clean+=("$f")
  done
  (cd "$HERE" && "$PYTHON" -m experiments.tables >/dev/null 2>&1) || true
  commit "queue job $n/${#JOBS[@]} ($folder): python -m experiments ${job//$HERE\//}" "$folder" results/queue_log.tsv \
    ${clean[@]+"${clean[@]}"}
  # A job that fails within a minute failed to start (bad flag, broken environment): stop, since the
  # next jobs would fail the same way; a job that failed later is logged and the queue goes on.
  if [ "$status" != 0 ] && [ "$((t1 - t0))" -lt 60 ]; then
    echo "run_queue: job $n failed within a minute (exit $status); stopping. Fix it and restart with: $0 $n" >&2
    exit 1
  fi
done
echo "run_queue: all ${#JOBS[@]} jobs done"
