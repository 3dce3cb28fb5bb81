"""The schema of a rollout's results.json, checked wherever one is read (reports, fronts, the benchmark's merge).

Why: a results.json is ranked, plotted and averaged; a NaN or a string where a number belongs would be silently
ranked first or last. Checked against this schema, a broken file is one error naming the file and the field.

Versions: 1 is every results.json written before ``schema_version`` existed (the committed reports); 2 adds the
field and nothing else, so both read alike. A version this code does not know (a newer writer) is refused.
Only the fields readers use are declared; the others are left as written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from policy_accel.errors import ResultsError
from policy_accel.warm_starts import is_warm_start, warm_start_choices

SCHEMA_VERSION = 2

Finite = Annotated[float, Field(allow_inf_nan=False)]
NonNegative = Annotated[float, Field(allow_inf_nan=False, ge=0)]
Count = Annotated[int, Field(ge=0)]


def _registered(name: str) -> str:
    if not is_warm_start(name):
        raise ValueError(f"not a warm start: expected {warm_start_choices()}")
    return name


class _Strict(BaseModel):
    """No coercion: "0.5" is not a number, 1.0 is not a count, "no" is not a boolean."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class LatencyMs(_Strict):
    p50: NonNegative
    p95: NonNegative


class ConditionMs(_Strict):
    p50: NonNegative
    mean: NonNegative


class Iterations(_Strict):
    mean: NonNegative
    p95: NonNegative


class Nfe(_Strict):
    mean: NonNegative


class Episode(_Strict):
    seed: int
    max_reward: Finite


class RolloutResults(_Strict):
    """What eval/rollout.py (and eval/benchmark.py's merge) write and the reports read."""

    schema_version: Literal[1, 2] = 1
    policy: str
    solver: str
    warm_start: bool | Annotated[str, AfterValidator(_registered)]  # a warm start's key (policy_accel/warm_starts.py)
    approximate: bool = False
    renoise_steps: Annotated[int, Field(ge=1)] | None = None
    solver_options: dict[str, Any] | None = None
    warm_options: dict[str, Any] | None = None
    schedule: dict[str, Any] | None = None
    noise: str = "fresh"
    n_episodes: Annotated[int, Field(ge=1)]
    seeds: Annotated[list[int], Field(min_length=1)]
    latency_seeds: list[int] | None = None
    score: Finite
    success_rate: Annotated[float, Field(allow_inf_nan=False, ge=0, le=1)]
    latency_ms: LatencyMs
    condition_ms: ConditionMs | None = None  # observation -> condition inside each inference (an image encoder)
    iterations: Iterations
    nfe: Nfe
    max_abs_dev: NonNegative | None = None
    unconverged_inferences: Count = 0
    latencies_ms: list[NonNegative] = []
    episodes: list[Episode] | None = None
    experiment: str | None = None
    overrides: list[str] | None = None
    hardware: str | None = None


def check_results(path: Path, data: Any) -> RolloutResults:
    """``data`` (read from ``path``) checked against the schema; :class:`ResultsError` names the file and field."""
    try:
        return RolloutResults.model_validate(data)
    except ValidationError as err:
        problems: dict[str, str] = {}
        for field, text in (_problem(data, e) for e in err.errors()):
            problems.setdefault(field, text)  # one per field: a union reports each branch
        raise ResultsError(f"{path}: " + "; ".join(problems.values())) from None


def _problem(data: Any, error: dict) -> tuple[str, str]:
    """(field, ``field=value is not allowed: why``) with the field as written in the file (no union branches)."""
    node, keys = data, []
    for key in error["loc"]:
        if isinstance(node, dict) and key in node or isinstance(node, list) and isinstance(key, int):
            node = node[key]
            keys.append(str(key))
        else:
            break
    field = ".".join(keys) or "(the file)"
    if error["type"] == "missing":
        missing = ".".join([*keys, str(error["loc"][len(keys)])])
        return missing, f"{missing}: missing"
    value = repr(node)
    return field, f"{field}={value if len(value) <= 60 else value[:57] + '...'} is not allowed: {error['msg']}"


__all__ = ["SCHEMA_VERSION", "RolloutResults", "check_results"]
