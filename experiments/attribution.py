"""Gap attribution (`ept-hw attribute RUN`): which non-ideality makes the analog − twin gap.

A finished, non-diverged `compare` run is re-run from its own configuration and tile (the run's
``config.toml`` and ``tile.toml``: runs are self-contained) for `seeds` seeds (seed index k runs
with seed + `SEED_STRIDE`·k on the run's data order, as a sweep does; k = 0 is the run's own seed):

- once in full (the run's tile unchanged), analog path only;
- once per factor with that one non-ideality removed (`FACTORS`), analog path only;
- once with every chosen factor removed together ("all removed"), analog path only;
- once the twin, digital path only: the twin does not depend on the device, so the twin of seed k
  is shared by every analog run of seed k (same initial weights, batches and generators).

Every run is a task of the sweep engine (`experiments.sweep.engine.run_sweep`: parallel workers,
one atomic record per task, resume), under ``RUN/attribution/`` (``points/``, ``runs/``,
``tiles/``): finished tasks are never redone. With L the final validation loss of a run (its
summary's `final_val_loss`: the fixed validation set when the run has one) and seed k:

    gap_full_k      = L_full_k − L_twin_k
    gap_without_f_k = L_f_k − L_twin_k
    explained_f_k   = gap_full_k − gap_without_f_k             (= L_full_k − L_f_k)
    gap_all_k       = L_all_k − L_twin_k
    interaction_k   = gap_full_k − Σ_f explained_f_k − gap_all_k

Each is averaged over seeds with its standard error and 95 % interval (`experiments.sweep.stats.
gap_stats`); the share of a factor is mean explained_f / mean gap_full. Writes
``attribution.json``, ``attribution.md`` (the table) and ``attribution.png`` (per factor the gap
with it removed, beside the full gap; `plot_attribution`).

With every tile factor removed the tile is the one the twin stands for (an ideal device by plain
SGD, perfect periphery), so the "all removed" gap checks the list itself: what remains there is a
difference between the paths that no factor names (`ideal_device` was added when the demo's
all-removed gap was +0.050 without it; with it, +0.001).

Most factors edit the run's tile; `exact_stabilisers` edits its configuration instead
(`stabilisers.resreg_source` "arrays" -> "readout": resreg computed from the read-out weights,
as jacreg and eigreg always are). It applies only to a run whose resreg was on-chip; with the
default "readout" the stabilisers are already exact and it is left out. The twin of a seed is
shared by every factor run and keeps the run's own setting (on its exact reads "arrays" differs
from "readout" only by using the window-averaged force).

A run diverged in a factor run is a result (its gap is null and the factor's row says so), not an
error.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from crossbar.config import RefreshParameters, save_tile_config, tile_config_from_dict
from crossbar.presets import perfect_io
from devices import preset
from devices.symmetric import symmetric_device
from ept_hw.config import ConfigError, to_dict
from experiments.markdown import table as md_table
from experiments.sweep.axes import point_id
from experiments.sweep.device import SEED_STRIDE
from experiments.sweep.engine import run_sweep
from experiments.sweep.stats import gap_stats
from trainer.config import run_config_from_dict
from trainer.loop import EXIT_INTERRUPTED, run
from trainer.rundir import RunDirectory, RunLock, atomic_write, atomic_write_json

__all__ = ["FACTORS", "Factor", "AttributionResult", "attribute_run", "attribution_point", "factor_tile", "factor_config",
           "check_run", "choose_factors", "attribution_points", "attribution_table", "markdown", "SUBDIR", "TABLE_JSON", "TABLE_MD", "PLOT"]

logger = logging.getLogger(__name__)

SUBDIR = "attribution"  # the command's own sub-folder of the run
TABLE_JSON = "attribution.json"
TABLE_MD = "attribution.md"
PLOT = "attribution.png"


# ------------------------------------------------------------------------------ factors
def _io_fields(tile: Any, **values: float) -> Any:
    fwd = dataclasses.replace(tile.forward, **values)
    bwd = dataclasses.replace(tile.backward, **values)
    return tile.replace(forward=fwd, backward=bwd)


def _perfect(tile: Any) -> bool:
    return tile.forward.is_perfect and tile.backward.is_perfect


def _periphery_na(tile: Any) -> str | None:
    return "the periphery is already perfect" if _perfect(tile) else None


def _periphery(tile: Any) -> Any:
    return tile.replace(forward=perfect_io(), backward=perfect_io())


def _quant_na(tile: Any) -> str | None:
    if _perfect(tile):
        return "the periphery is perfect (no DAC/ADC quantisation)"
    if all(io.is_perfect or (io.inp_res <= 0 and io.out_res <= 0) for io in (tile.forward, tile.backward)):
        return "inp_res and out_res are already off (<= 0)"
    return None


def _quant(tile: Any) -> Any:
    return _io_fields(tile, inp_res=0.0, out_res=0.0)


_NOISE_FIELDS = ("out_noise", "w_noise", "inp_noise")


def _noise_na(tile: Any) -> str | None:
    if _perfect(tile):
        return "the periphery is perfect (no read noise)"
    if all(io.is_perfect or all(getattr(io, k) == 0 for k in _NOISE_FIELDS) for io in (tile.forward, tile.backward)):
        return "out_noise, w_noise and inp_noise are already 0"
    return None


def _noise(tile: Any) -> Any:
    return _io_fields(tile, **{k: 0.0 for k in _NOISE_FIELDS})


def _symmetric_na(tile: Any) -> str | None:
    dev = tile.device_config()
    if dev.is_ideal:
        return "an ideal device has no up and down steps"
    if tile.uses_pair:
        return ("a differential pair pulses each of its devices one way only (up); its up/down asymmetry is not "
                "a device's")
    if symmetric_device(dev) == dev:
        return f"the {dev.model} device is already symmetric (devices.symmetric)"
    return None


def _symmetric(tile: Any) -> Any:
    return tile.replace(device=symmetric_device(tile.device_config()).to_dict())


def _c2c_changes(dev: Any) -> dict[str, float]:
    names = ("dw_min_std", "write_noise_std", "dw_min_std_add", "dw_min_std_slope")
    return {k: 0.0 for k in names if hasattr(dev, k) and getattr(dev, k) != 0}


def _c2c_na(tile: Any) -> str | None:
    dev = tile.device_config()
    if dev.is_ideal:
        return "an ideal device has no cycle-to-cycle noise"
    if not _c2c_changes(dev):
        return f"the {dev.model} device has no cycle-to-cycle noise (dw_min_std and write noise are 0)"
    return None


def _c2c(tile: Any) -> Any:
    dev = tile.device_config()
    return tile.replace(device=dev.replace(**_c2c_changes(dev)).to_dict())


def _d2d_changes(dev: Any) -> dict[str, float]:
    names = [f.name for f in dataclasses.fields(dev) if f.name.endswith("_dtod")] + ["reference_std"]
    return {k: 0.0 for k in names if hasattr(dev, k) and getattr(dev, k) != 0}


def _d2d_na(tile: Any) -> str | None:
    dev = tile.device_config()
    if dev.is_ideal:
        return "an ideal device has no device-to-device spread"
    if not _d2d_changes(dev):
        return f"the {dev.model} device has no device-to-device spread (every *_dtod is 0)"
    return None


def _d2d(tile: Any) -> Any:
    dev = tile.device_config()
    return tile.replace(device=dev.replace(**_d2d_changes(dev)).to_dict())


def _ideal_na(tile: Any) -> str | None:
    if tile.device_config().is_ideal and tile.programming_noise == 0.0:
        return "the device is already ideal (exact updates by plain SGD, no programming noise)"
    return None


def _ideal(tile: Any) -> Any:
    # an ideal device takes plain SGD only (TileConfig), is never a pair, and has no refresh
    return tile.replace(device=preset("ideal").to_dict(), algorithm="sgd", programming_noise=0.0,
                        differential="auto", refresh=RefreshParameters())


def _stabilisers_na(cfg: Any) -> str | None:
    if cfg is None:
        return "no run configuration to read the stabiliser settings from"
    st = cfg.stabilisers
    if st.resreg <= 0:
        return "resreg is off (jacreg and eigreg always use the read-out weights)"
    if st.resreg_source == "readout":
        return ("the stabilisers already use exact weights (stabilisers.resreg_source = 'readout'; jacreg and eigreg "
                "always do)")
    return None


def _stabilisers(cfg: Any) -> Any:
    return dataclasses.replace(cfg, stabilisers=dataclasses.replace(cfg.stabilisers, resreg_source="readout"))


@dataclass(frozen=True)
class Factor:
    """One non-ideality: what removing it means, when it does not apply (a reason, else None), and
    the edit that removes it: of the run's tile (`target` "tile", the default) or of its
    configuration (`target` "config": `not_applicable` and `remove` then take the `RunConfig`)."""

    name: str
    meaning: str
    not_applicable: Callable[[Any], str | None]
    remove: Callable[[Any], Any]
    target: str = "tile"


FACTORS: dict[str, Factor] = {f.name: f for f in (
    Factor("periphery", "perfect periphery: forward and transposed reads with is_perfect IO (no DAC/ADC, noise, "
           "bounds or bound management)", _periphery_na, _periphery),
    Factor("quantisation", "DAC/ADC quantisation off: inp_res = out_res = 0 (none) on both reads",
           _quant_na, _quant),
    Factor("read_noise", "read noise off: out_noise = w_noise = inp_noise = 0 on both reads", _noise_na, _noise),
    Factor("symmetric", "symmetric device: up step at w = down step at -w, per model (devices.symmetric)",
           _symmetric_na, _symmetric),
    Factor("c2c", "cycle-to-cycle noise off: dw_min_std = 0, write_noise_std = 0 (and exp_step's dw_min_std_add/slope)",
           _c2c_na, _c2c),
    Factor("d2d", "device-to-device spread off: every *_dtod = 0 (and soft_bounds_reference's reference_std)",
           _d2d_na, _d2d),
    Factor("ideal_device", "ideal device: exact weight updates and writes (no pulses, step granularity, "
           "state-dependent steps, bounds, spreads or programming noise), by plain SGD, the only algorithm an ideal "
           "device takes (a mixed-precision or transfer tile's algorithm is dropped with it)", _ideal_na, _ideal),
    Factor("exact_stabilisers", "exact-weight stabilisers: resreg from the read-out weights "
           "(stabilisers.resreg_source = 'readout') instead of the arrays' reads", _stabilisers_na, _stabilisers,
           target="config"),
)}


def factor_tile(tile: Any, remove: Sequence[str]) -> Any:
    """The tile with every factor in `remove` removed, in `FACTORS` order; a factor that no longer
    applies after an earlier one (quantisation after perfect periphery) is already removed."""
    unknown = [f for f in remove if f not in FACTORS]
    if unknown:
        raise ConfigError("factor", ", ".join(unknown), "one of " + ", ".join(FACTORS))
    for name, factor in FACTORS.items():
        if factor.target == "tile" and name in remove and factor.not_applicable(tile) is None:
            tile = factor.remove(tile)
    return tile


def factor_config(cfg: Any, remove: Sequence[str]) -> Any:
    """The run configuration with every configuration factor in `remove` removed."""
    for name, factor in FACTORS.items():
        if factor.target == "config" and name in remove and factor.not_applicable(cfg) is None:
            cfg = factor.remove(cfg)
    return cfg


# ------------------------------------------------------------------------------ the point function
def _task_config(context: Mapping[str, Any], path: str, device: str | None, remove: Sequence[str] = ()) -> Any:
    cfg = run_config_from_dict(context["config"])
    k = int(context.get("point_seed") or 0)
    if k:
        cfg = dataclasses.replace(cfg, seed=cfg.seed + SEED_STRIDE * k, data_seed=cfg.order_seed)
    # a tile file written for the task is the whole tile: the run's overrides are already in it
    analog = cfg.analog if device is None else dataclasses.replace(cfg.analog, device=device, periphery="default", tile={})
    return factor_config(dataclasses.replace(cfg, mode="ep", path=path, analog=analog), remove)


def attribution_point(overrides: Mapping[str, Any], context: Mapping[str, Any]) -> dict[str, Any]:
    """One attribution task (module level, so that worker processes import it).

    ``overrides``: ``{"twin": True}`` (the digital twin, mode "ep" path "twin") or ``{"remove":
    [factors]}`` (the analog path alone with those factors removed from the run's tile). The
    task's tile is written to ``tiles/<task>.toml`` and its run to ``runs/<task>/``.
    """
    torch.set_num_threads(int(context.get("_threads", 1)))
    out = Path(context["_out_dir"])
    k = context.get("point_seed")
    tid = point_id(overrides) if k is None else f"{point_id(overrides)}-s{k}"
    if overrides.get("twin"):
        cfg = _task_config(context, "twin", None)
        tile_rel = None
    else:
        tile = factor_tile(tile_config_from_dict(context["tile"]), list(overrides.get("remove", [])))
        tile_path = out / "tiles" / f"{tid}.toml"
        tile_path.parent.mkdir(parents=True, exist_ok=True)
        save_tile_config(tile_path, tile)
        cfg = _task_config(context, "analog", str(tile_path.resolve()), list(overrides.get("remove", [])))
        tile_rel = str(tile_path.relative_to(out))
    run_dir = out / "runs" / tid
    if run_dir.exists():  # left by an interrupted attempt at this task (it has no record): start over
        shutil.rmtree(run_dir)
    result = run(cfg, run_dir, progress=False)
    if result.exit_code == EXIT_INTERRUPTED or result.summary.get("interrupted"):
        raise KeyboardInterrupt
    # the run's final figure (the fixed validation set when the run has one, else the last logged
    # evaluation): the figure the original run's gap is quoted in (`attribution_table`)
    losses = result.summary.get("final_val_loss") or {}
    diverged = result.summary.get("divergence")
    key = "twin" if overrides.get("twin") else "analog"
    return {
        f"{key}_val_loss": None if diverged else losses.get(key),
        f"{key}_diverged": bool(diverged),
        "divergence": diverged,
        "steps": result.steps_completed,
        "seed": cfg.seed,
        "run_dir": str(run_dir.relative_to(out)),
        "tile": tile_rel,
    }


# ------------------------------------------------------------------------------ checks
def check_run(run_dir: str | Path) -> tuple[Any, Any, dict[str, Any]]:
    """The run's (`RunConfig`, `TileConfig`, summary), or a clear error (the CLI's exit 2) when it
    cannot be attributed: not a run, not a `compare` run, incomplete, interrupted or diverged."""
    rd = RunDirectory(run_dir)
    if not rd.path.is_dir() or not rd.config_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no {rd.CONFIG}): train one with `ept-hw compare`")
    cfg = rd.config()
    if cfg.mode != "compare":
        raise ValueError(f"{run_dir} is a {cfg.mode!r} run: attribution needs a `compare` run (analog and twin)")
    summary = rd.read_summary()
    if summary.get("divergence"):
        ev = summary["divergence"]
        raise ValueError(f"{run_dir} diverged at step {ev.get('step')} ({ev.get('message')}): its gap is not "
                         "defined, there is nothing to attribute")
    done = summary.get("steps_completed")
    if summary.get("interrupted") or done is None or done < cfg.training.steps:
        raise ValueError(f"{run_dir} is incomplete ({done if done is not None else 'no summary, unknown'} of "
                         f"{cfg.training.steps} steps): finish it with `ept-hw compare --resume --out {run_dir}` first")
    tile = rd.tile_config()
    if tile is None:
        raise ValueError(f"{run_dir} has no {rd.TILE} (a run written before runs kept their own tile): re-run it")
    return cfg, tile, summary


def choose_factors(tile: Any, factors: Sequence[str] | None, cfg: Any = None) -> tuple[list[str], dict[str, str]]:
    """(factors to run, {factor: why not applicable}); an explicitly requested factor that does not
    apply is refused (`ConfigError`). `cfg`: the run's `RunConfig` (the configuration factors')."""
    skipped = {n: why for n, f in FACTORS.items()
               if (why := f.not_applicable(cfg if f.target == "config" else tile)) is not None}
    if factors is None:
        chosen = [n for n in FACTORS if n not in skipped]
    else:
        chosen = []
        for name in factors:
            if name not in FACTORS:
                raise ConfigError("factor", name, "one of " + ", ".join(FACTORS))
            if name in skipped:
                raise ConfigError("factor", name, f"a factor that applies to this run ({skipped[name]})")
            if name not in chosen:
                chosen.append(name)
        skipped = {n: why for n, why in skipped.items() if n in factors}
    if not chosen:
        raise ConfigError("factor", "none", "at least one factor that applies to this run (" + "; ".join(
            f"{n}: {why}" for n, why in skipped.items()) + ")")
    return chosen, skipped


# ------------------------------------------------------------------------------ the job
@dataclass
class AttributionResult:
    out_dir: Path
    table: dict[str, Any]
    json_path: Path
    md_path: Path
    plot_path: Path | None


def attribution_points(chosen: Sequence[str]) -> list[dict[str, Any]]:
    pts: list[dict[str, Any]] = [{"twin": True}, {"remove": []}]
    pts += [{"remove": [f]} for f in chosen]
    if len(chosen) > 1:
        pts.append({"remove": list(chosen)})
    return pts


def task_context(cfg: Any, tile: Any, out: Path, threads: int = 1) -> dict[str, Any]:
    """What every task of an attribution is handed (`attribution_point`'s context): the run's
    configuration and tile as plain data, the output folder and the torch threads."""
    return {"config": json.loads(json.dumps(to_dict(cfg), default=str)),
            "tile": json.loads(json.dumps(tile.to_dict(), default=str)),
            "_out_dir": str(out), "_threads": int(threads)}


def attribute_run(run_dir: str | Path, *, seeds: int = 2, workers: int = 1, factors: Sequence[str] | None = None,
                  threads: int = 1, retry_failed: bool = False,
                  on_record: Callable[[dict[str, Any]], None] | None = None) -> AttributionResult:
    """`ept-hw attribute RUN` (module docstring). Checks everything before writing: a bad run, a
    bad seed count or a factor that does not apply raise, and nothing is written; afterwards only
    ``RUN/attribution/`` is written, under its lock (`trainer.rundir.RunLock`: a second attribution
    of the same run at the same time is refused)."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 2:
        raise ConfigError("seeds", seeds, "an integer >= 2 (a mean and its spread)")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError("workers", workers, "an integer >= 1")
    cfg, tile, summary = check_run(run_dir)
    chosen, skipped = choose_factors(tile, factors, cfg)
    rd = RunDirectory(run_dir)
    out = rd.subdir(SUBDIR, create=False).resolve()
    context = task_context(cfg, tile, out, threads)
    points = attribution_points(chosen)
    out.mkdir(exist_ok=True)
    with RunLock(out):  # one attribution of a run at a time (a second one is refused, naming the holder)
        records = run_sweep(attribution_point, points, out, context=context, workers=workers,
                            retry_failed=retry_failed, on_record=on_record, seeds=list(range(seeds)))
        table = attribution_table(records, chosen, skipped, seeds, summary)
        json_path, md_path, plot_path = write_attribution(out, table)
    return AttributionResult(out, table, json_path, md_path, plot_path)


# ------------------------------------------------------------------------------ the table
def _stats(values: Sequence[float | None]) -> dict[str, Any]:
    s = gap_stats([v for v in values if v is not None])
    return {"mean": s.mean, "se": s.se, "lo": s.lo, "hi": s.hi, "n": s.n}


def attribution_table(records: Sequence[Mapping[str, Any]], chosen: Sequence[str], skipped: Mapping[str, str],
                      seeds: int, summary: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The attribution figures from the engine's records (module docstring for the formulas)."""
    by: dict[tuple[str, int], Mapping[str, Any]] = {}
    for r in records:
        ov = r.get("overrides") or {}
        key = "twin" if ov.get("twin") else ("full" if not ov.get("remove") else
                                             (ov["remove"][0] if len(ov["remove"]) == 1 else "all"))
        by[(key, int(r.get("seed_index") or 0))] = r
    if len(chosen) == 1:  # one factor: "all removed" is that factor's run
        for k in range(seeds):
            if (chosen[0], k) in by:
                by[("all", k)] = by[(chosen[0], k)]

    def loss(key: str, k: int) -> float | None:
        r = by.get((key, k))
        if r is None or r.get("status") != "ok":
            return None
        v = r.get("twin_val_loss" if key == "twin" else "analog_val_loss")
        return None if v is None or not math.isfinite(float(v)) else float(v)

    def status(key: str) -> str:
        recs = [by.get((key, k)) for k in range(seeds)]
        if any(r is None for r in recs):
            return "missing"
        if any(r.get("status") != "ok" for r in recs):
            return "failed: " + str(next(r.get("error") for r in recs if r.get("status") != "ok"))
        if any(r.get("analog_diverged") or r.get("twin_diverged") for r in recs):
            return "diverged"
        return "ok"

    per_seed: list[dict[str, Any]] = []
    for k in range(seeds):
        twin, full, allr = loss("twin", k), loss("full", k), loss("all", k)
        g_full = None if twin is None or full is None else full - twin
        g_all = None if twin is None or allr is None else allr - twin
        expl = {f: (None if full is None or loss(f, k) is None else full - loss(f, k)) for f in chosen}
        inter = None
        if g_full is not None and g_all is not None and all(v is not None for v in expl.values()):
            inter = g_full - sum(expl.values()) - g_all
        per_seed.append({"seed_index": k, "seed": (by.get(("full", k)) or {}).get("seed"), "twin_val_loss": twin,
                         "full_val_loss": full, "gap_full": g_full, "gap_all_removed": g_all, "explained": expl,
                         "interaction": inter,
                         "gap_without": {f: (None if twin is None or loss(f, k) is None else loss(f, k) - twin)
                                         for f in chosen}})
    full_stats = _stats([s["gap_full"] for s in per_seed])
    g = full_stats["mean"]

    def share(x: float | None) -> float | None:
        return None if x is None or g is None or g == 0 else x / g

    rows = []
    for f in chosen:
        st = _stats([s["explained"][f] for s in per_seed])
        rows.append({"factor": f, "meaning": FACTORS[f].meaning, "status": status(f),
                     "gap_without": _stats([s["gap_without"][f] for s in per_seed]),
                     "explained": st, "share": share(st["mean"])})
    inter = _stats([s["interaction"] for s in per_seed])
    all_stats = _stats([s["gap_all_removed"] for s in per_seed])
    original = None
    if summary is not None:
        fv = summary.get("final_val_loss") or {}
        if fv.get("analog") is not None and fv.get("twin") is not None:
            original = fv["analog"] - fv["twin"]
    return {
        "kind": "ept-hw gap attribution",
        "gap": "analog - twin final validation loss (nats)",
        "seeds": seeds,
        "factors": list(chosen),
        "not_applicable": dict(skipped),
        "original_run_gap": original,
        "gap_full": full_stats,
        "full_status": status("full"),
        "twin_status": status("twin"),
        "rows": rows,
        "interaction": {**inter, "share": share(inter["mean"])},
        "gap_all_removed": {**all_stats, "share": share(all_stats["mean"]), "status": status("all")},
        "per_seed": per_seed,
    }


def _f(x: Any, spec: str = "+.4f") -> str:
    return "—" if x is None else format(x, spec)


def _pm(st: Mapping[str, Any]) -> str:
    if st.get("mean") is None:
        return "—"
    return _f(st["mean"]) + ("" if st.get("se") is None else f" ± {st['se']:.4f}")


def markdown(table: Mapping[str, Any]) -> str:
    """The attribution table as Markdown (the run report includes it)."""
    g = table["gap_full"]
    lines = [f"Gap = analog − twin final validation loss (nats), mean ± standard error over {table['seeds']} seeds "
             f"(each seed's twin shared by its analog runs). Full re-run gap: **{_pm(g)}** "
             f"(95 % interval {_f(g.get('lo'))} … {_f(g.get('hi'))}; the original run's gap: "
             f"{_f(table.get('original_run_gap'))}).\n"]
    rows = []
    for r in table["rows"]:
        rows.append([f"`{r['factor']}`", r["meaning"], _pm(r["gap_without"]), _pm(r["explained"]),
                     _f(r["share"], ".0%") if r["share"] is not None else "—", r["status"]])
    inter, alr = table["interaction"], table["gap_all_removed"]
    partial = inter.get("n") is not None and inter["n"] < table["seeds"]
    rows.append(["interaction", "full − Σ explained − all removed", "", _pm(inter),
                 _f(inter.get("share"), ".0%") if inter.get("share") is not None else "—",
                 f"from {inter['n']} of {table['seeds']} seeds (a run failed on the others)" if partial else ""])
    rows.append(["all removed", "every factor above removed together", _pm(alr), "",
                 _f(alr.get("share"), ".0%") if alr.get("share") is not None else "—", alr.get("status", "")])
    lines.append(md_table(["factor", "removed", "gap without it", "explained (full − without)", "share", "status"],
                          rows))
    if table.get("not_applicable"):
        lines.append("\nNot applicable to this run: " + "; ".join(
            f"`{n}` ({why})" for n, why in table["not_applicable"].items()) + ".")
    if table.get("not_a_factor"):  # tables written before exact_stabilisers was a factor
        lines.append("\nNot a factor: " + "; ".join(table["not_a_factor"].values()) + ".")
    return "\n".join(lines) + "\n"


def plot_attribution(table: Mapping[str, Any], path: Path) -> Path | None:
    """Per factor, the gap with that factor removed (a horizontal bar, error bar: standard error
    over seeds), beside the full gap (dashed line, shaded ± its standard error) and zero; the
    last row is the gap with every factor removed. Each bar's label gives what the factor
    explains (full − without) and its share. Not a waterfall: the factors overlap (`periphery`
    contains `quantisation` and `read_noise`, `ideal_device` the device factors) and interact,
    so their explained parts do not add up to the gap, and a chart that stacked them would
    suggest they do."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = table["gap_full"]
    g = full["mean"]
    if g is None:
        return None
    rows = [(r["factor"], r["gap_without"], r["explained"], r["share"], r["status"]) for r in table["rows"]]
    alr = table["gap_all_removed"]
    rows.append(("all removed", alr, None, alr.get("share"), alr.get("status", "")))
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.6))
    ys = list(range(len(rows)))[::-1]
    se = full["se"] or 0.0
    ax.axvspan(g - se, g + se, color="#bbbbbb", alpha=0.5, linewidth=0)
    ax.axvline(g, color="#444444", linestyle="--", linewidth=1.0, label=f"full gap {g:+.4f}")
    ax.axvline(0.0, color="black", linewidth=0.8)
    values = [st["mean"] for _, st, _, _, _ in rows if st["mean"] is not None] + [g, 0.0]
    span = (max(values) - min(values)) or abs(g) or 1.0
    for y, (name, st, expl, share, status) in zip(ys, rows):
        if st["mean"] is None:
            ax.text(0.0, y, f"  {status or 'no value'}", va="center", fontsize=9, color="#e76f51")
            continue
        color = "#444444" if expl is None else ("#2a9d8f" if st["mean"] <= g else "#e76f51")
        ax.barh(y, st["mean"], xerr=st["se"] or 0.0, color=color, height=0.6, capsize=3)
        note = f"{st['mean']:+.4f}"
        if expl is not None and expl["mean"] is not None:
            note += f"   explains {expl['mean']:+.4f}" + (f" ({share:.0%})" if share is not None else "")
        ax.text(max(st["mean"], 0.0) + (st["se"] or 0.0) + 0.02 * span, y, note, va="center", fontsize=8)
    ax.set_yticks(ys)
    ax.set_yticklabels([r[0] for r in rows])
    lo, hi = min(values), max(values)
    ax.set_xlim(min(lo, 0.0) - 0.05 * span, hi + 0.75 * span)
    ax.set_xlabel("analog − twin validation loss with the factor removed [nats]")
    ax.set_title(f"Gap attribution ({table['seeds']} seeds): green narrows the gap, red widens it; "
                 "explained parts overlap and need not add up", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()

    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    plt.close(fig)
    return path


def write_attribution(out: Path, table: Mapping[str, Any]) -> tuple[Path, Path, Path | None]:
    """``attribution.json``, ``attribution.md`` and ``attribution.png`` under `out` (atomic writes)."""
    json_path = atomic_write_json(out / TABLE_JSON, dict(table), allow_nan=False)
    md_path = atomic_write(out / TABLE_MD, "# Gap attribution\n\n" + markdown(table))
    plot_path = plot_attribution(table, out / PLOT)
    return json_path, md_path, plot_path
