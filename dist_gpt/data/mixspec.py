"""The text forms of a data mixture (`data.mix`, `data.mix_phases`, `data.mix_eval_weights`).

    --data.mix=web:data/web:0.7,code:data/code:0.3          NAME:PATH:WEIGHT, comma-separated
    --data.mix_phases=800:web=0.2,code=0.8                  FROM_POSITION:NAME=WEIGHT,...; phases ';'-separated
    --data.mix_eval_weights=web=0.5,code=0.5

The TOML forms (`[data.mix.web]` tables with `path` and `weight`, `[[data.mix_phases]]` tables
with `from` and one key per source) are turned into these strings when the file is read, so a
run's config (and its checkpoint) holds one canonical string per option. A path may not contain
',' or ';'. Pure text: no file is opened here (dist_gpt.data.mixture opens the datasets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dist_gpt.errors import ConfigError


@dataclass(frozen=True)
class SourceSpec:
    name: str
    path: str
    weight: float


def _weight(text: str, what: str, fix: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not text.strip() or math.isnan(value) or math.isinf(value) or value < 0:
        raise ConfigError(f"{what}: weight {text.strip() or '(missing)'!r} must be a number >= 0; {fix}")
    return value


def parse_mix(text: str) -> list[SourceSpec]:
    """'web:data/web:0.7,code:data/code:0.3' -> sources in that order; ConfigError naming the source."""
    fix = "write data.mix as NAME:PATH:WEIGHT,... (e.g. web:data/web:0.7,code:data/code:0.3)"
    sources: list[SourceSpec] = []
    for item in [p for p in text.split(",") if p.strip()]:
        name, _, rest = item.strip().partition(":")
        path, _, weight = rest.rpartition(":")
        if not name or not path:
            raise ConfigError(f"data.mix entry {item.strip()!r} is not NAME:PATH:WEIGHT; {fix}")
        if any(s.name == name for s in sources):
            raise ConfigError(f"data.mix source {name!r} is named twice: give each source its own name")
        sources.append(SourceSpec(name, path, _weight(weight, f"data.mix source {name!r}", fix)))
    if not sources:
        raise ConfigError(f"data.mix is empty; {fix}")
    if not sum(s.weight for s in sources) > 0:
        raise ConfigError("data.mix: every weight is 0; give at least one source a weight above 0")
    return sources


def parse_weights(text: str, names: list[str], option: str) -> dict[str, float]:
    """'web=0.2,code=0.8' -> {name: weight} over `names` (an unnamed source gets 0; not all 0)."""
    fix = f"write {option} as NAME=WEIGHT,... with the names of data.mix ({', '.join(names)})"
    weights = dict.fromkeys(names, 0.0)
    for item in [p for p in text.split(",") if p.strip()]:
        name, eq, value = item.strip().partition("=")
        if not eq:
            raise ConfigError(f"{option} entry {item.strip()!r} is not NAME=WEIGHT; {fix}")
        if name.strip() not in weights:
            raise ConfigError(f"{option} names source {name.strip()!r}, which data.mix does not have; {fix}")
        weights[name.strip()] = _weight(value, f"{option} source {name.strip()!r}", fix)
    if not sum(weights.values()) > 0:
        raise ConfigError(f"{option}: every weight is 0; give at least one source a weight above 0")
    return weights


def parse_phases(text: str, names: list[str]) -> list[tuple[int, dict[str, float]]]:
    """'800:web=0.2,code=0.8;900:code=1' -> [(800, {...}), (900, {...})], positions strictly increasing."""
    phases: list[tuple[int, dict[str, float]]] = []
    for item in [p for p in text.split(";") if p.strip()]:
        start, colon, weights = item.strip().partition(":")
        try:
            position = int(start)
        except ValueError:
            position = -1
        if not colon or position < 1:
            raise ConfigError(f"data.mix_phases entry {item.strip()!r} is not FROM:NAME=WEIGHT,... with FROM a global "
                              "batch position >= 1 (e.g. 800:web=0,code=1)")
        if phases and position <= phases[-1][0]:
            raise ConfigError(f"data.mix_phases: the phase from {position} comes after the one from {phases[-1][0]}; "
                              "list phases in increasing order of position")
        phases.append((position, parse_weights(weights, names, f"data.mix_phases (from {position})")))
    return phases


def format_mix(tables: dict, origin: str) -> str:
    """The TOML form {'web': {'path': ..., 'weight': ...}, ...} as the one-flag string."""
    items = []
    for name, table in tables.items():
        if not isinstance(table, dict) or set(table) - {"path", "weight"} or "path" not in table:
            raise ConfigError(f"config file {origin}: [data.mix.{name}] takes path = \"DIR\" and weight = NUMBER")
        items.append(f"{name}:{table['path']}:{table.get('weight', '')}")
    return ",".join(items)


def format_phases(tables: list, origin: str) -> str:
    """The TOML form [{'from': 800, 'web': 0.2, 'code': 0.8}, ...] as the one-flag string."""
    items = []
    for table in tables:
        if not isinstance(table, dict) or "from" not in table:
            raise ConfigError(f"config file {origin}: each [[data.mix_phases]] needs from = POSITION and NAME = WEIGHT keys")
        weights = ",".join(f"{k}={v}" for k, v in table.items() if k != "from")
        items.append(f"{table['from']}:{weights}")
    return ";".join(items)
