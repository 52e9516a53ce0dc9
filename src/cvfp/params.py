"""The params.yaml schema: every hyperparameter, its type and its allowed range.

`load_params()` reads params.yaml the way DVC does (YAML 1.2, so `1e-3` is a float and
`no` is a string), refuses duplicate keys, and validates strictly: a string where a number
belongs is an error, never coerced. Errors name the key (`phase1.lr`) and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ruamel.yaml import YAML
from ruamel.yaml.constructor import DuplicateKeyError
from ruamel.yaml.error import YAMLError

from cvfp.errors import ParamsError

PARAMS_FILE = "params.yaml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class DataParams(_Section):
    source: Literal["chitchat", "hub", "files"] = "chitchat"
    hub_name: str = "HuggingFaceH4/ultrachat_200k"
    hub_split: str = "train_sft"
    files: list[str] = []
    num_samples: PosInt = 150

    @model_validator(mode="after")
    def _files_given(self) -> "DataParams":
        if self.source == "files" and not self.files:
            raise ValueError("data.files must list at least one .txt/.jsonl path when data.source is 'files'")
        return self


class TokenizerParams(_Section):
    vocab_size: Annotated[int, Field(ge=300, le=1_000_000)] = 1024  # >= 256 bytes + specials
    min_frequency: PosInt = 2


class CarveParams(_Section):
    method: Literal["tail"] = "tail"
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.15
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.15
    unseen: Literal["mask", "drop_docs", "fail"] = "mask"
    max_unscored_fraction: Fraction = 0.5  # of a held-out part's predictions, unscored for unseen ids

    @model_validator(mode="after")
    def _tail_leaves_training(self) -> "CarveParams":
        # in floats: a sum of exactly 1 that rounds below it leaves no training bytes, refused by the held-out rule
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"carve.val_fraction + carve.test_fraction must be below 1 (training is the rest), "
                             f"got {self.val_fraction} + {self.test_fraction}")
        return self


class ModelParams(_Section):
    context_dim: PosInt = 64
    embed_dim: PosInt = 64
    hidden_dim: PosInt = 128
    layer_structure: Annotated[list[PosInt], Field(min_length=1)] = [1, 1, 1, 1, 1, 1]
    layernorm_mix: Fraction = 1.0
    init_std: PosFloat = 0.1
    bias_init_std: NonNegFloat = 0.01
    embedding_init_std: PosFloat = 1.0
    decoder: bool = False

    @model_validator(mode="after")
    def _hidden_is_sum(self) -> "ModelParams":
        if self.hidden_dim != self.context_dim + self.embed_dim:
            raise ValueError(
                f"model.hidden_dim must equal model.context_dim + model.embed_dim "
                f"({self.context_dim} + {self.embed_dim} = {self.context_dim + self.embed_dim}), "
                f"got {self.hidden_dim}"
            )
        return self


class Phase1Params(_Section):
    max_iterations: PosInt = 30
    lr: PosFloat = 0.002
    grad_clip: PosFloat = 1.0
    dist_reg_weight: Fraction = 0.1
    diversity: Literal["global_deviation", "ema_variance"] = "global_deviation"
    ema_momentum: Annotated[float, Field(ge=0, lt=1)] = 0.99  # per token (the seed's); per iteration ** N
    recon_weight: NonNegFloat = 0.0
    convergence_threshold: PosFloat = 0.03
    min_converged_ratio: Fraction = 0.95
    batch_tokens: PosInt = 8192
    precision: Literal["fp32", "bf16"] = "fp32"
    effective_rank_samples: NonNegInt = 8192
    checkpoint_interval: PosInt = 1  # iterations between resume checkpoints (models/phase1.resume.pt)
    max_nonfinite_steps: PosInt = 3  # consecutive non-finite losses before the stage stops as diverged


class CstarParams(_Section):
    pass


class Phase2Params(_Section):
    epochs: PosInt = 10
    batch_size: PosInt = 512
    lr: PosFloat = 0.001
    grad_clip: PosFloat = 1.0
    patience: PosInt = 3
    context_stability_weight: NonNegFloat = 1.0
    context_mode: Literal["stability", "replace"] = "stability"
    freeze_context: bool = False
    freeze_embedding: bool = False
    precision: Literal["fp32", "bf16"] = "fp32"
    checkpoint_interval: PosInt = 1  # epochs between resume checkpoints (models/phase2.resume.pt)
    max_nonfinite_steps: PosInt = 100  # consecutive non-finite batch losses before the stage stops as diverged


class EvaluateParams(_Section):
    batch_size: PosInt = 2048
    identity_samples: PosInt = 512
    identity_threshold: Fraction = 0.95
    num_trials: Annotated[int, Field(ge=3)] = 10  # the original's; a slope needs >= 2 recorded MSEs
    final_diff_threshold: PosFloat = 1e-3
    slope_threshold: PosFloat = 0.05  # relative: |slope of the trial MSEs| / their mean, per trial
    contraction_samples: PosInt = 16
    contraction_power_iterations: PosInt = 200  # used where context_dim > exact_eigen_max_dim
    exact_eigen_max_dim: NonNegInt = 256  # context_dim up to which the spectral radius is exact (eigenvalues)
    lyapunov_steps: NonNegInt = 4096  # Jacobians along the trajectory per Lyapunov estimate; 0 = the whole stream
    lyapunov_blocks: Annotated[int, Field(ge=2)] = 8  # block means for its standard error (after one burn-in block)
    attractor_cosine: Fraction = 0.99
    attractor_distance: PosFloat = 0.1
    zero_norm: PosFloat = 0.1
    effective_rank_samples: NonNegInt = 8192  # rows sampled (seeded) for effective rank and spectrum; 0 = all
    pairwise_samples: Annotated[int, Field(ge=2)] = 1024  # rows sampled for mean pairwise cosine/distance


class GRUBaselineParams(_Section):
    layers: PosInt = 1
    lr: PosFloat = 0.003


class TransformerBaselineParams(_Section):
    layers: PosInt = 2
    heads: PosInt = 4
    ffn_mult: PosInt = 4
    lr: PosFloat = 0.003


class BaselinesParams(_Section):
    seq_len: Annotated[int, Field(ge=2)] = 64
    batch_size: PosInt = 32
    budget_tokens: NonNegInt = 0  # training tokens; 0 = Phase 2's: phase2.epochs x (train tokens - 1)
    patience: PosInt = 3
    grad_clip: PosFloat = 1.0
    max_nonfinite_steps: PosInt = 100  # consecutive non-finite batch losses before the stage stops as diverged
    gru: GRUBaselineParams = GRUBaselineParams()
    transformer: TransformerBaselineParams = TransformerBaselineParams()


class CompareParams(_Section):
    sample_prompts: NonNegInt = 3  # validation documents (evenly spaced) whose first user turn is a sample prompt
    max_new_tokens: PosInt = 40
    temperature: NonNegFloat = 0.8  # 0 = greedy
    top_k: NonNegInt = 40  # 0 = the whole vocabulary


class DistributedParams(_Section):
    nproc_per_node: Annotated[int, Field(ge=1, le=1024)] = 1


class Params(_Section):
    seed: NonNegInt = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataParams = DataParams()
    tokenizer: TokenizerParams = TokenizerParams()
    carve: CarveParams = CarveParams()
    model: ModelParams = ModelParams()
    phase1: Phase1Params = Phase1Params()
    cstar: CstarParams = CstarParams()
    phase2: Phase2Params = Phase2Params()
    evaluate: EvaluateParams = EvaluateParams()
    baselines: BaselinesParams = BaselinesParams()
    compare: CompareParams = CompareParams()
    distributed: DistributedParams = DistributedParams()

    @model_validator(mode="after")
    def _recon_needs_decoder(self) -> "Params":
        if self.phase1.recon_weight > 0 and not self.model.decoder:
            raise ValueError("phase1.recon_weight > 0 needs model.decoder: true")
        nproc = self.distributed.nproc_per_node
        for key, size in (("phase2.batch_size", self.phase2.batch_size),
                          ("baselines.batch_size", self.baselines.batch_size)):
            if size % nproc:
                raise ValueError(f"{key}={size} must be divisible by distributed.nproc_per_node={nproc} "
                                 f"(each process takes an equal share of a batch)")
        return self

    def flat(self) -> dict[str, Any]:
        """Params flattened to dotted keys (`phase1.dist_reg_weight`), as MLflow and DVC name them."""
        return flatten(self.model_dump())



def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def read_yaml(path: str | Path) -> Any:
    """Read YAML 1.2 as DVC does, refusing duplicate keys."""
    yaml = YAML(typ="safe", pure=True)
    yaml.allow_duplicate_keys = False
    try:
        with open(path, encoding="utf-8") as handle:
            return yaml.load(handle)
    except DuplicateKeyError as err:
        raise ParamsError(f"{path}: duplicate key: {err.problem} {err.problem_mark}") from None
    except YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{key}: unknown key"
    if kind == "literal_error":
        return f"{key}: {error['msg'].lower()}, got {error['input']!r}"
    if kind == "missing":
        return f"{key}: missing"
    return f"{key}: {error['msg']} (got {error.get('input')!r})"


def _missing_keys(raw: dict[str, Any], schema: type[BaseModel], prefix: str = "") -> list[str]:
    """Schema keys that the YAML does not set (only inside sections that are mappings)."""
    missing = []
    for name, info in schema.model_fields.items():
        annotation = info.annotation
        if name not in raw:
            missing.append(f"{prefix}{name}")
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel) and isinstance(raw[name], dict):
            missing.extend(_missing_keys(raw[name], annotation, f"{prefix}{name}."))
    return missing


def validate(raw: Any, origin: str = PARAMS_FILE, complete: bool = True) -> Params:
    """Validate a parsed params tree. With `complete`, every key must be set explicitly: a value
    that silently came from a code default would be invisible to `dvc params diff` and `-S`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{origin}: the top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        params = Params.model_validate(raw)
    except ValidationError as err:
        lines = [_describe(e) for e in err.errors(include_url=False)]
        allowed = sorted(Params.model_fields)
        raise ParamsError(
            f"{origin}: invalid params:\n  " + "\n  ".join(lines) + f"\n(top-level keys allowed: {', '.join(allowed)})"
        ) from None
    missing = _missing_keys(raw, Params) if complete else []
    if missing:
        raise ParamsError(f"{origin}: every hyperparameter must be set explicitly; missing: {', '.join(missing)}")
    return params


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Load and validate params.yaml; raise ParamsError naming the offending key."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    return validate(read_yaml(path), str(path))
