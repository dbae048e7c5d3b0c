"""Streamlit glue shared by the pages: cached loaders, the sidebar and error display. No science here."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import streamlit as st

from jpq_core.data.stereo_files import middlebury_motorcycle
from jpq_core.data.synthetic_stereo import make_scene, scene_seed
from jpq_core.errors import JPQError
from jpq_core.evaluation import stereo_comparison
from jpq_core.jobs import JobQueue, is_owner_token, new_owner
from jpq_core.links import OWNER_PARAMETER, read_link
from jpq_core.live import (LIVE_ACTIVATION_BITS, LIVE_ALLOCATIONS, LIVE_NETWORKS as OFFERED_NETWORKS, LIVE_WEIGHT_BITS,
                           RECOVERY_CHOICES, SPARSITY_CHOICES, Evaluation, LiveConfig, LiveNetwork, LiveResult,
                           shared_live_network)
from jpq_core.compressed import detach
from jpq_core.models import DEFAULT_CLASSES, is_shipped, load_network, network_label
from jpq_core.pipeline import load_any
from jpq_core.registry import criterion_names


def show_error(exc: JPQError) -> None:
    st.error(str(exc))


@st.cache_resource(show_spinner="Loading the stereo network...")
def cached_stereo_network():
    return load_network("stereo")


@st.cache_resource(show_spinner="Loading the classifier...")
def cached_classifier(name: str):
    return load_network(name)


@st.cache_resource(max_entries=1)
def _uploaded_pairs() -> dict:
    """Uploaded pairs by content hash, so that caches can key on a short string."""
    return {}


def remember_sample(digest: str, sample) -> str:
    pairs = _uploaded_pairs()
    if len(pairs) > 16:  # bounded memory on a shared server
        pairs.pop(next(iter(pairs)))
    pairs[digest] = sample
    return digest


@st.cache_data(show_spinner=False, max_entries=32)
def stereo_sample(source: str, key):
    """A pair by source: the Middlebury motorcycle, synthetic validation scene `key`, or an upload by hash."""
    if source == "Middlebury motorcycle":
        return middlebury_motorcycle()
    if source == "Your own pair":
        if key not in _uploaded_pairs():
            raise JPQError("the uploaded pair is no longer in memory; upload it again.")
        return _uploaded_pairs()[key]
    return make_scene(scene_seed("validation", key), 256, 512)


@st.cache_data(show_spinner="Running the network and SGBM...", max_entries=32)
def cached_comparison(source: str, key) -> dict:
    return stereo_comparison(cached_stereo_network(), stereo_sample(source, key))


def cached_network(name: str):
    """Any shipped network by name (the stereo network shares `cached_stereo_network`'s copy). Shared by all
    sessions: callers must not modify it (copy first)."""
    return cached_stereo_network() if name == "stereo" else cached_classifier(name)


@st.cache_resource(show_spinner=False)
def cached_task(name: str):
    """The compression task of a network (training batches, loss, evaluation data), made once."""
    from jpq_core.tasks import make_task

    return make_task(name)


# ---- Live compression: the configuration every page shares, kept in the URL -------------------------------

LIVE_NETWORKS = {name: network_label(name) for name in OFFERED_NETWORKS}  # offered in the sidebar, with their labels
_STATE = "live_config"  # session_state key of the current LiveConfig (widget state does not survive page switches)
_OWNER = "job_owner"  # session_state key of the session's fine-tuning job token, once it has one


def _bits_label(b) -> str:
    return "float" if b is None else str(b)


def current_config() -> LiveConfig:
    """The session's live configuration: from the URL on a session's first page, then from the sidebar."""
    if _STATE not in st.session_state:
        params = st.query_params.to_dict()
        config, problems = read_link(params)
        st.session_state[_STATE] = config
        st.session_state["live_config_problems"] = problems
        if is_owner_token(params.get(OWNER_PARAMETER)):  # a reloaded page finds its session's jobs again
            st.session_state[_OWNER] = params[OWNER_PARAMETER]
    return st.session_state[_STATE]


def job_owner(create: bool = False) -> str | None:
    """The session's fine-tuning job token (made when `create`, e.g. on its first job). It travels in the link
    (`job_owner=`), so a reloaded page lists the same jobs; another session, without it, sees none of them."""
    if create and _OWNER not in st.session_state:
        st.session_state[_OWNER] = new_owner()
    return st.session_state.get(_OWNER)


def job_queue() -> JobQueue:
    """The fine-tuning jobs kept beside the results table the pages read."""
    from jpq_core import report

    return JobQueue(report.RESULTS)


def sidebar_config() -> LiveConfig:
    """Sidebar widgets for the live configuration; writes it to the session and the URL (shareable link)."""
    config = current_config()
    for problem in st.session_state.pop("live_config_problems", []):
        st.warning(problem)
    with st.sidebar:
        st.header("Compression")
        network = st.selectbox("Network", list(LIVE_NETWORKS), index=list(LIVE_NETWORKS).index(config.network)
                               if config.network in LIVE_NETWORKS else 0, format_func=LIVE_NETWORKS.get, key="w_network")
        level = st.radio("Granularity", ["weight", "channel"], index=0 if config.granularity == "weight" else 1,
                         horizontal=True, key="w_granularity",
                         help="weight: any single weight can go; channel: whole filters go, with every channel coupled to them")
        criteria = criterion_names(level)
        criterion = st.selectbox("Criterion", criteria, index=criteria.index(config.criterion) if config.criterion in criteria else 0,
                                 key="w_criterion")
        allocation = st.radio("Allocation", list(LIVE_ALLOCATIONS), index=list(LIVE_ALLOCATIONS).index(config.allocation),
                              horizontal=True, key="w_allocation",
                              help="global: one threshold over all layers; uniform: the same sparsity in every layer; "
                                   "recovery-aware: per layer, from each layer's error at the output after least squares "
                                   "(needs a saved scan of the network; docs/recovery.md)")
        sparsity = st.select_slider("Sparsity", SPARSITY_CHOICES, value=config.sparsity, key="w_sparsity",
                                    format_func=lambda s: f"{s:.1%}", help="share of prunable weights removed")
        wbits = st.select_slider("Weight bits", LIVE_WEIGHT_BITS, value=config.wbits, format_func=_bits_label, key="w_wbits",
                                 help="1 = binary, 2 = ternary; float = 32-bit")
        abits = st.select_slider("Activation bits", LIVE_ACTIVATION_BITS, value=config.abits, format_func=_bits_label,
                                 key="w_abits")
        protect = st.checkbox("Keep first and last layer dense", value=config.protect_first_last, key="w_protect")
        recovery = st.selectbox("Recovery (no training)", list(RECOVERY_CHOICES), key="w_recovery",
                                index=list(RECOVERY_CHOICES).index(config.recovery),
                                format_func=lambda r: f"auto ({replace(config, network=network, recovery=r).recovery_method})"
                                if r == "auto" else r,
                                help="repair the compressed network in seconds on a few training samples (auto: the "
                                     "method that measured best for this network): bn re-estimates "
                                     "batch-norm statistics, lsq refits each layer's kept weights by least squares, obc "
                                     "chooses and refits them (Optimal Brain Compression), scale refits the network's own "
                                     "scalars (the stereo network's cost scale) to the dense outputs; docs/recovery.md has "
                                     "the measurements")
        checkpoint = config.checkpoint if network == config.network else ""
        with st.expander("Your own weights" + (" (in use)" if checkpoint else "") + ("" if checkpoint or is_shipped(network)
                                                                                    else ": none yet, random weights"),
                         expanded=not checkpoint and not is_shipped(network)):
            upload = st.file_uploader(f"A {LIVE_NETWORKS[network]} checkpoint: .safetensors, or a state dict from "
                                      "torch.save (loaded as weights only)" + ("" if is_shipped(network) else
                                      f"; the architecture with {DEFAULT_CLASSES} outputs, one per digit"),
                                      type=["safetensors", "pt", "pth", "bin"], key="w_upload")
            if upload is not None:
                try:
                    checkpoint = upload_checkpoint(network, upload.getvalue())
                    origin = live_network(network, checkpoint).compressed_from
                    st.success(f"Using {upload.name}." if origin is None else
                               f"Using {upload.name}: a compressed network with {origin['sparsity']:.1%} of its weights "
                               "pruned; live compression starts from its (pruned, quantized) weights.")
                except JPQError as exc:
                    st.error(f"{upload.name}: {exc}")
                    checkpoint = ""
            elif checkpoint and st.button("Back to the shipped weights" if is_shipped(network) else "Back to random weights",
                                          key="w_shipped"):
                checkpoint = ""
    new = LiveConfig(network=network, criterion=criterion, allocation=allocation, sparsity=sparsity, wbits=wbits,
                     abits=abits, protect_first_last=protect, calibration=config.calibration, checkpoint=checkpoint,
                     recovery=recovery)
    st.session_state[_STATE] = new
    owner = {OWNER_PARAMETER: job_owner()} if job_owner() else {}
    st.query_params.from_dict({**new.to_query(), **owner})
    return new


def untrained_notice(config: LiveConfig, what: str = "") -> None:
    """Say plainly, before any number, that a network with random weights has meaningless accuracy, and which
    of the page's numbers hold anyway; `what` adds what this page shows of it."""
    if not config.untrained:
        return
    st.warning(f"**Random weights.** {network_label(config.network)} is torchvision's architecture, randomly "
               "initialised: no trained weights ship for it and none are uploaded, so its **accuracy and predictions are "
               "meaningless** (chance is 10% on the digits). What does not depend on training is real: weight memory, "
               "BOPs, energy and hardware cost, the criterion scores and the engine's speed. " + what +
               "Upload weights trained for the digits in the sidebar (Your own weights) for meaningful accuracy.",
               icon="⚠️")


def network_weights(network: str, checkpoint: str = ""):
    """The dense network with the given weights: the shipped (or, for a torchvision architecture, the seeded
    random) ones, or an upload's. Shared by all sessions: callers must not modify it (copy first)."""
    return live_network(network, checkpoint).dense if checkpoint else cached_network(network)


UPLOADS = Path(__file__).resolve().parents[1] / "runs" / "uploads"


def upload_checkpoint(network: str, data: bytes) -> str:
    """Keep an uploaded checkpoint under its content hash and check that it loads into `network` (weights only,
    never unpickled; mismatching tensors named); returns the hash the configuration refers to it by."""
    from jpq_core.checkpoints import MAX_CHECKPOINT_BYTES, atomic_write

    if len(data) > MAX_CHECKPOINT_BYTES:
        raise JPQError(f"the checkpoint is {len(data) / 2**20:.0f} MiB, over the {MAX_CHECKPOINT_BYTES // 2**20} MiB limit.")
    digest = hashlib.sha1(data).hexdigest()
    path = UPLOADS / f"{digest}.ckpt"
    if not path.exists():
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    try:
        live_network(network, digest)  # loads now, so a bad file is reported at upload, not later
    except JPQError as exc:
        path.unlink(missing_ok=True)
        raise JPQError(str(exc).replace(f"{path}: ", "")) from None
    return digest


@st.cache_resource(show_spinner="Preparing the network for live compression...", max_entries=8)
def live_network(network: str, checkpoint: str = "") -> LiveNetwork:
    if not checkpoint:
        return shared_live_network(network) if is_shipped(network) else LiveNetwork(network, load_network(network))
    path = UPLOADS / f"{checkpoint}.ckpt"
    if not path.exists():
        raise JPQError("the uploaded checkpoint of this link is not on this server; upload it again in the sidebar.")
    model, compressed = load_any(network, path)  # a compressed network's weights are a starting point too
    return LiveNetwork(network, detach(model) if compressed else model, compressed_from=compressed)


def ensure_scores(config: LiveConfig) -> None:
    """Compute the criterion's statistics once (a gradient pass), with a progress bar the first time."""
    network = live_network(config.network, config.checkpoint)
    if network.has_stats(config):
        return
    bar = st.progress(0.0, text=f"Scoring weights with {config.criterion} (once per network and criterion)...")
    network.stats(config, progress=lambda i, n: bar.progress(i / n, text=f"Gradient pass: batch {i} of {n}"))
    bar.empty()


@st.cache_resource(show_spinner=False, max_entries=48)
def live_result(config: LiveConfig) -> LiveResult:
    """Shared between sessions: a LiveResult is never modified after it is made. With recovery, the result
    without it is made first (and cached: the page shows it while recovery runs) and a copy is recovered."""
    raw = live_result(config.without_recovery()) if config.recovery_method != "none" else None
    result = live_network(config.network, config.checkpoint).compress(config, raw=raw)
    _READY.add(config)
    return result


_READY: set = set()  # configurations whose live result is made (and so cached), as far as this process knows


def live_result_ready(config: LiveConfig) -> bool:
    """Whether `live_result(config)` returns at once (a page can show something else while it is made)."""
    return config in _READY


@st.cache_resource(show_spinner="Evaluating the dense network...", max_entries=4)
def dense_evaluation(network: str, checkpoint: str = "") -> Evaluation:
    return live_network(network, checkpoint).dense_evaluation()


def _kib(bits: float) -> str:
    return f"{bits / 8 / 1024:,.1f} KiB"


def cost_cards(cost: dict) -> None:
    """Cost model cards against dense float32: memory and BOPs (counted), energy and hardware cost (estimates)."""
    cols = st.columns(4)
    cols[0].metric("Weight memory", _kib(cost["weight_bits"]), delta=f"{cost['memory_ratio']:.2%} of dense",
                   delta_color="off", help=f"dense float32: {_kib(cost['dense_weight_bits'])}; {cost['assumptions']['memory']}")
    cols[1].metric("BOPs", f"{cost['bops'] / 1e9:,.2f} G", delta=f"{cost['bops_ratio']:.2%} of dense", delta_color="off",
                   help=f"bit operations = non-zero MACs x weight bits x activation bits; dense: {cost['dense_bops'] / 1e9:,.0f} G")
    cols[2].metric("Energy (estimate)", f"{cost['energy_pj'] / 1e6:,.1f} µJ", delta=f"{cost['energy_ratio']:.2%} of dense",
                   delta_color="off", help=cost["assumptions"]["energy"])
    cols[3].metric("Hardware cost (estimate)", f"{cost['hardware_cost_ratio']:.2%} of dense",
                   help=cost["assumptions"]["hardware_cost"])
    st.caption("Memory and BOPs are counted from the compressed network; energy and hardware cost are estimates "
               "from a 45 nm model (hover a card for its assumptions; docs/costs.md has the formulas).")


@st.cache_data(show_spinner="Running the compressed network...", max_entries=32)
def compressed_disparity(config: LiveConfig, source: str, key) -> dict:
    """{"disparity", "metrics"} of the live-compressed stereo network on a pair (metrics None without ground truth)."""
    sample = stereo_sample(source, key)
    evaluation = live_network("stereo").evaluate(live_result(config).model, sample)
    return {"disparity": evaluation.disparity, "metrics": evaluation.metrics or None}


def set_config(config: LiveConfig) -> None:
    """Make `config` the session's live configuration (the sidebar shows it on the next run of any page)."""
    st.session_state[_STATE] = config
    for key in [k for k in st.session_state if k.startswith("w_")]:
        del st.session_state[key]  # widgets take their value from the configuration again


def cached_results():
    """The sweeps table and the problems reading it, re-read whenever the table or its checkpoints folder
    changes (a sweep's or a fine-tuning job's new row shows at once, on every page and in every session)."""
    from jpq_core import report
    from jpq_core.sweeps import checkpoint_dir

    stamp = []
    for path in (report.RESULTS, checkpoint_dir(report.RESULTS)):
        try:
            stat = path.stat()
            stamp.append((stat.st_mtime_ns, stat.st_size))
        except OSError:
            stamp.append(None)
    return _results_as_of(str(report.RESULTS), tuple(stamp))


@st.cache_data(show_spinner=False, max_entries=4)
def _results_as_of(path: str, stamp):
    """`report.load_results` of the table at `path` as it was at `stamp` (modification times and sizes)."""
    from jpq_core.report import load_results

    return load_results(Path(path))


# ---- Maps as images, and results that arrive after the page has answered ----------------------------------

@st.cache_data(show_spinner=False, max_entries=4)
def stereo_reference_images(network: str, checkpoint: str = "") -> dict:
    """PNGs that do not change with the sliders: the left image and the dense network's disparity map, and the
    colour limit both disparity maps share."""
    from jpq_core.data import stereo_eval_samples
    from jpq_core.images import disparity_limit, disparity_png, rgb_png

    sample = stereo_eval_samples("middlebury")[0]
    zmax = disparity_limit(sample.disparity)
    return {"left": rgb_png(sample.left), "dense": disparity_png(dense_evaluation(network, checkpoint).disparity, zmax),
            "zmax": zmax}


@st.cache_data(show_spinner=False, max_entries=64)
def compressed_images(config: LiveConfig) -> dict:
    """PNGs of the live configuration's disparity map and its error against the ground truth."""
    from jpq_core.data import stereo_eval_samples
    from jpq_core.images import disparity_png, error_map, error_png

    sample = stereo_eval_samples("middlebury")[0]
    disparity = live_result(config).evaluation.disparity
    zmax = stereo_reference_images(config.network, config.checkpoint)["zmax"]
    return {"compressed": disparity_png(disparity, zmax), "error": error_png(error_map(disparity, sample.disparity))}


def image_with_title(container, title: str, png: bytes) -> None:
    """A title above an image (not on it: nothing hides it), the image filling the column."""
    container.markdown(f"**{title}**")
    container.image(png, width="stretch", output_format="PNG")  # "auto" would re-encode it as JPEG


def deferred(waiting: str, compute, render) -> None:
    """A result that takes longer than the rest of the page: the page answers without it, shows `waiting`
    here, and fills in `render(compute())` when it is ready. A parallel fragment: it runs beside the rest of
    the page's script, and its own widgets rerun only it. Errors of `compute` are shown here, not raised."""

    @st.fragment(parallel=True)
    def slot():
        holder = st.empty()
        holder.info(waiting, icon="⏳")
        try:
            value = compute()
        except JPQError as exc:
            holder.error(str(exc))
            return
        with holder.container():
            render(value)

    slot()


def path_caption(result: LiveResult, dense: Evaluation) -> str:
    """Which path computed the live configuration's evaluation, how long it took, and dense PyTorch's time."""
    t = result.timings
    compiled = f" (compiling the program: {t['compile']:.2f} s)" if result.evaluation.path == "engine" else ""
    return (f"Computed by **{'the sparse integer engine' if result.evaluation.path == 'engine' else 'PyTorch'}** in "
            f"{result.evaluation.seconds:.2f} s{compiled}: {result.path_note}. Dense PyTorch on the same input: "
            f"{dense.seconds:.2f} s (the uncompressed network, timed when it was first evaluated).")


@st.cache_resource(show_spinner=False, max_entries=8)
def pytorch_result(config: LiveConfig) -> LiveResult:
    """The live configuration computed by PyTorch whatever the engine could do (to check the engine)."""
    return live_network(config.network, config.checkpoint).compress(config, engine=False)
