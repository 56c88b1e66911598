"""The MLflow layout every etbench run follows; analysis reads exactly these names.

One MLflow run = one resolved run config (one model, one seed, one split) of one grid; each grid also has one parent
run (below) whose children the trial runs are.

Experiment: the grid name (``etbench-single`` for a run started outside a grid).

Tags (all strings):
    etbench.config_hash       stable hash of the resolved run config (dedup key)
    etbench.grid              grid name
    etbench.task              "image" | "graph"
    etbench.model             the model's registry name (``etbench.models.registry.names(task)``)
    etbench.dataset           dataset name (digits, mnist, cifar10, imagenet, tolokers, ...)
    etbench.protocol          "masked-completion" (image) | "bwgnn" | "gadbench" (graph)
    etbench.seed              integer seed
    etbench.split             split index (graph tasks; "-1" when not applicable)
    etbench.axis.<name>       value of each swept grid axis (e.g. etbench.axis.model.steps = "4")
    etbench.paper_comparable  "true" | "false" (small presets are not paper-comparable)
    etbench.git_commit        commit where the run was submitted (stamped by the submitter; "unknown" when the
                              code came from an image built without GIT_COMMIT)
    etbench.code_hash         16 hex of sha256 over the source (.py files) of the etbench package the training
                              process imported (rank 0 of a Ray Train run): the code that ran, observed
    etbench.device_name       the GPU's name (torch.cuda.get_device_name) of a GPU run, else the CPU model
    etbench.hostname          host name of the process that trained (rank 0)
    etbench.node_ip           Ray node IP of the process that trained (rank 0; the host's address outside Ray)
    etbench.nodes_spanned     distributed (Ray Train) runs: how many distinct Ray nodes its workers ran on
    etbench.precision         the regime it trained in: "autocast-bf16" (one worker on GPU, train.bf16: fp32
                              weights, bf16 autocast), "bf16" (DeepSpeed with bf16: bf16 weights and bf16
                              gradient reduction), "fp32" (CPU, or train.bf16 false); cost and accuracy of runs
                              differing here or in device_name are not comparable
    etbench.git_dirty         true/false: uncommitted changes to tracked files where the run was submitted
    etbench.dataset_checksum  checksum / file-list hash of the data
    etbench.versions          JSON of package versions
    etbench.error             reason, when the run FAILED
    etbench.stage             "tune" | "final" (grids with a tuning section; absent otherwise)
    etbench.tune.group        the search a tuning/final run belongs to (model + hash of its axis values)
    etbench.tune.params       JSON of the searched hyper-parameters of a tuning/final run
    etbench.tune.metric       "<validation metric>:<min|max>" the search selected on
    etbench.tuned_from        run id of the tuning run whose configuration a final run re-runs
    etbench.stopped_early     "<scheduler> at epoch <k>" when a tuning run was stopped early (e.g. by ASHA)
    etbench.tune.search_seed  the grid's tuning.search_seed of a tuning run (the searcher's own seed is derived
                              from it and the group: tuning.group_seed); tells independent searches of one group
                              apart
    etbench.attempts          how many times the run was opened (1 + retries, restarts and --resume re-attaches);
                              set from the second attempt on (absent: opened once);
                              the run id itself is kept in the trial folder's tracking.json (tracking/identity.py)
    etbench.superseded        "true" on a run that `etbench sweep run --force` replaced; such a run is never
                              reused, deduplicated against, or analysed (its folder is moved aside, not deleted)
    etbench.superseded_at     UTC time of the --force that superseded the run
    etbench.closed_reason     why the sweep closed a run KILLED (a second live run of a config hash, say)
    mlflow.parentRunId        the grid's parent run (MLflow's nested-run tag: the UI folds a grid's trials under
                              one row); set when a trial's run is created or re-attached by a sweep

The grid's parent run (one per grid, results folder and experiment; ``etbench.sweep.grid_parent``) holds no config
hash, params or metrics; every reader of trial runs leaves it out by its tag ``etbench.kind``:
    etbench.kind              "grid" on the parent run (absent on trial runs)
    etbench.grid              grid name
    etbench.grid.key          the grid's identity: hash of grid name, experiment and results folder (the parent
                              is found by it when the results folder's grid_run.json is lost)
    etbench.grid.content_hash sha256 of the grid file the latest sweep ran
    etbench.grid.storage      the results folder (storage root) the grid runs into
    etbench.attempts          how many sweeps opened the parent run (set from the second on)
    etbench.closed_reason     why it ended FAILED or KILLED (trials failed, trials not run, sweep interrupted)
    etbench.analysis.margins  JSON: metric name (a TASK_METRIC_NAMES leaf) → equivalence margin δ > 0, from the
                              grid file's ``analysis.equivalence_margins`` ("{}" when it declares none); the
                              report's TOST column reads it
  Status: RUNNING while a sweep runs; FINISHED when every trial of the grid finished; FAILED (a trial failed or
  the sweep raised) or KILLED (interrupted, or trials left unrun) otherwise; re-opened by the next sweep.
  Artifacts: grid/<grid file>, plan.json (trial list with config hashes; a tuned grid: its searches), cost.json
  (the plan's cost estimate), history/<content hash>/ (those of an earlier version of the grid file), and after
  ``etbench report`` report/ (the report folder, its cache left out).

Params: the resolved config flattened with dotted keys (``model.steps``, ``train.lr``, ...).

Metrics (step = epoch unless noted):
    <split>/<name>            per-epoch metrics, split in {train, val, test}
                              image: loss, mse_masked, mse_chosen, psnr
                              graph: loss, auroc, auprc, macro_f1, rec_at_k
    best/<split>/<name>       value at the best-validation epoch (the headline numbers)
    energy/E, energy/E_att, energy/E_hn, energy/dx_norm
                              ET only; step = descent step t, mean over evaluated samples at the end
    energy/rise_fraction      fraction of (sample, step) pairs where E rose
    energy/grad_norm_mean, energy/grad_norm_max
                              ET only; step = descent step t (0..T): mean over samples of the mean / max over
                              tokens of ‖∂E/∂g‖ at the point E is measured
    energy/rel_update         ET only; step = update t (0..T−1): mean over samples of ‖x_{t+1} − x_t‖ / ‖x_t‖
    energy/fixed_point_step   ET only; the first update t at which energy/rel_update is below the tolerance
                              (``etbench.models.energy.FIXED_POINT_TOL``); absent when it never is
    cost/params, cost/wall_s (summed over the run's attempts), cost/flops_per_sample (inference: forward FLOPs
                              per sample), cost/throughput (training samples per second), cost/peak_mem_mb
                              (peak memory of the training step: GPU allocator peak / CPU live tensor bytes),
                              cost/process_peak_rss_mb
                              (the process's peak RSS during the trial: interpreter, libraries, data),
                              cost/samples_seen (training samples over all epochs and workers; the report's
                              training FLOPs ≈ 3 × flops_per_sample × samples_seen), cost/train_s (seconds in
                              training epochs, evaluation and setup left out)

Artifacts: config.json, metrics.csv, energy_trace.csv (columns: step, sample, E, E_att, E_hn, dx_norm, rose, and
    the diagnostics grad_norm_mean, grad_norm_max, rel_update, fixed_point_step: per sample, "" when never; traces
    written before the diagnostics existed lack them, so readers require only the first seven),
    reconstruction.png, memories.png (images), checkpoint/ (optional).
    dynamics/dynamics.csv, dynamics/dynamics.{png,pdf}: written by ``etbench dynamics --run-id`` (test-time probe of
    a finished run): one row per (eval_steps, alpha_scale); columns eval_steps, alpha_scale, the run's test/*
    metrics, then DYNAMICS_COLUMNS (empty where undefined: energy columns of vit-tied, delta_norm at T' = 0,
    fixed_point_step when never reached).
"""

from __future__ import annotations

TAG_PREFIX = "etbench."
TAG_CONFIG_HASH = "etbench.config_hash"
#: The hash a run had before the execution settings left the config hash (set by ``etbench tracking rehash``).
TAG_CONFIG_HASH_V1 = "etbench.config_hash_v1"
TAG_GRID = "etbench.grid"
TAG_TASK = "etbench.task"
TAG_MODEL = "etbench.model"
TAG_DATASET = "etbench.dataset"
TAG_PROTOCOL = "etbench.protocol"
TAG_SEED = "etbench.seed"
TAG_SPLIT = "etbench.split"
TAG_AXIS_PREFIX = "etbench.axis."
TAG_PAPER_COMPARABLE = "etbench.paper_comparable"
TAG_GIT_COMMIT = "etbench.git_commit"
TAG_GIT_DIRTY = "etbench.git_dirty"
TAG_CODE_HASH = "etbench.code_hash"  # sha256 (16 hex) of the etbench source the training process imported
TAG_DEVICE_NAME = "etbench.device_name"  # GPU name, or the CPU model of a CPU run
TAG_HOSTNAME = "etbench.hostname"  # host of the process that trained (rank 0)
TAG_NODE_IP = "etbench.node_ip"  # Ray node IP of the process that trained (rank 0)
TAG_NODES_SPANNED = "etbench.nodes_spanned"  # Ray Train runs: distinct nodes of the run's workers
TAG_PRECISION = "etbench.precision"  # "autocast-bf16" | "bf16" | "fp32" (etbench.engine.provenance.precision)
TAG_DATASET_CHECKSUM = "etbench.dataset_checksum"
TAG_VERSIONS = "etbench.versions"
TAG_ERROR = "etbench.error"
TAG_STAGE = "etbench.stage"
TAG_TUNE_GROUP = "etbench.tune.group"
TAG_TUNE_PARAMS = "etbench.tune.params"
TAG_TUNE_METRIC = "etbench.tune.metric"
TAG_TUNED_FROM = "etbench.tuned_from"
TAG_STOPPED_EARLY = "etbench.stopped_early"
TAG_TUNE_SEARCH_SEED = "etbench.tune.search_seed"
TAG_TUNE_SPACE = "etbench.tune.space"  # JSON: dotted key → {distribution, low, high, values} (tuning + final runs)
TAG_ATTEMPTS = "etbench.attempts"
TAG_SUPERSEDED = "etbench.superseded"
TAG_SUPERSEDED_AT = "etbench.superseded_at"
TAG_CLOSED_REASON = "etbench.closed_reason"
STAGE_TUNE, STAGE_FINAL = "tune", "final"
TAG_PARENT_RUN = "mlflow.parentRunId"  # MLflow's own nested-run tag (mlflow.utils.mlflow_tags.MLFLOW_PARENT_RUN_ID)
TAG_KIND = "etbench.kind"
KIND_GRID = "grid"
TAG_GRID_KEY = "etbench.grid.key"
TAG_GRID_CONTENT_HASH = "etbench.grid.content_hash"
TAG_GRID_STORAGE = "etbench.grid.storage"
TAG_ANALYSIS_MARGINS = "etbench.analysis.margins"
GRID_RUN_FILE = "grid_run.json"  # <results>/<grid>/grid_run.json: the grid's parent run id (etbench.sweep.grid_parent)
REPORT_ARTIFACT_DIR = "report"

#: The headline metric names each task logs (as ``best/test/<name>``, most important first): what the report
#: shows and what a grid's equivalence margins may name.
TASK_METRIC_NAMES: dict[str, tuple[str, ...]] = {
    "image": ("mse_masked", "psnr"),
    "graph": ("auroc", "auprc", "macro_f1", "rec_at_k"),
    "graphcls": ("acc",),  # graph classification: accuracy on the outer test fold
}

ENERGY_METRICS = ("energy/E", "energy/E_att", "energy/E_hn", "energy/dx_norm")
ENERGY_RISE = "energy/rise_fraction"
ENERGY_DIAGNOSTICS = ("energy/grad_norm_mean", "energy/grad_norm_max", "energy/rel_update")
ENERGY_FIXED_POINT = "energy/fixed_point_step"
FIXED_POINT_TOL = 1e-3  # the relative-update tolerance of fixed_point_step (= etbench.models.energy's, tested)
COST_METRICS = ("cost/params", "cost/flops_per_sample", "cost/wall_s", "cost/throughput", "cost/peak_mem_mb",
                "cost/process_peak_rss_mb", "cost/samples_seen", "cost/train_s")
ENERGY_TRACE_ARTIFACT = "energy_trace.csv"
ENERGY_TRACE_COLUMNS = ("step", "sample", "E", "E_att", "E_hn", "dx_norm", "rose")  # required of every trace
ENERGY_TRACE_DIAGNOSTICS = ("grad_norm_mean", "grad_norm_max", "rel_update", "fixed_point_step")  # written, optional
DYNAMICS_ARTIFACT = "dynamics.csv"
DYNAMICS_KEYS = ("eval_steps", "alpha_scale")
DYNAMICS_COLUMNS = ("energy", "grad_norm", "delta_norm", "rose_fraction", "fixed_point_step")
DEFAULT_EXPERIMENT = "etbench-single"


def best_metric(split: str, name: str) -> str:
    """Name of the headline metric ``name`` on ``split`` at the best-validation epoch."""
    return f"best/{split}/{name}"
