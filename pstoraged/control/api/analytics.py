"""Routes that explain the pool's data: data reduction now (pool and per
volume), the capacity history and forecast, device health, data temperature
and tiering. The figures come from the analytics service (analytics/) and
from walks of the volumes' maps (engine/usage.py). Included by build_app().
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query

from ...analytics.temperature import Thresholds
from ...engine.engine import Volume
from ...engine.usage import VolumeWalk, WalkSpec
from .context import Ctx
from .models import ERRORS, HORIZONS_PATTERN, MaxAge

router = APIRouter()


@router.get("/api/v1/metrics/reduction", tags=["pool"],
            summary="Data reduction now (pool and per volume) and the ingest counters")
async def reduction(ctx: Ctx, max_age: MaxAge = 60.0) -> dict[str, Any]:
    def specs() -> tuple[Any, list[Volume], list[int], list[WalkSpec], int]:
        eng = ctx.engine
        vols = sorted(eng.volumes.values(), key=lambda v: v.name)
        sp = [WalkSpec(v.id, v.gen, tuple(v.frozen)) for v in vols]
        sp += [WalkSpec(vid, None, ()) for vid in eng.reclaiming]
        return eng.statistics(), vols, list(eng.reclaiming), sp, eng.changes

    st, vols, reclaiming, sp, version = await ctx.call(specs, flush=True)
    ctx.usage.forget({x.vid for x in sp})
    walks, as_of = await ctx.usage.walks(sp, version, max_age)
    return reduction_report(vols, st, walks, reclaiming, as_of)


def reduction_report(vols: list[Volume], st: Any, walks: dict[int, VolumeWalk],
                     reclaiming: list[int], as_of: float) -> dict[str, Any]:
    """Data-reduction figures, each explained, for the pool and per volume.

    The pool row and the volume rows have the same definitions (current
    data: logical, unique, stored); a volume's unique and stored bytes are
    its share of the pool's (usage.py). The ingest counters (cumulative:
    what was written, not what is held) are reported apart, under `ingest`.
    """
    per_volume = {}
    by = {"volumes": 0.0, "snapshots": 0.0, "destroyed_volumes": 0.0, "released": 0.0}
    exact = True
    for v in vols:
        w = walks[v.id]
        exact &= w.exact
        if v.destroyed_ns:
            by["destroyed_volumes"] += w.total_stored_share
            continue
        by["volumes"] += w.stored_share
        by["snapshots"] += w.snapshot_stored_share
        by["released"] += w.released_stored_share
        s = v.stats
        logical, unique, stored = w.logical_bytes, round(w.unique_share), round(w.stored_share)
        per_volume[v.name] = {
            "provisioned_bytes": v.size,
            "logical_bytes": logical,
            "unique_bytes": unique,
            "stored_bytes": stored,
            "exclusive_bytes": w.exclusive_bytes,
            "shared_bytes": w.shared_bytes,
            "snapshot_stored_bytes": round(w.snapshot_stored_share),
            "dedupe_saved_bytes": logical - unique,
            "compression_saved_bytes": unique - stored,
            "dedupe_ratio": _ratio(logical, unique),
            "compression_ratio": _ratio(unique, stored),
            "data_reduction_ratio": _ratio(logical, stored),
            "thin_provisioning_ratio": _ratio(v.size, logical),
            "ingest": {
                "written_bytes": s.written_bytes,
                "zero_bytes": s.zero_bytes,
                "dedupe_bytes": s.dedupe_bytes,
                "new_chunk_bytes": s.unique_bytes,
                "new_chunk_stored_bytes": s.stored_bytes,
                "reduction_ratio": _ratio(s.written_bytes, s.stored_bytes),
            },
        }
    by["released"] += sum(walks[vid].total_stored_share for vid in reclaiming)
    live = [v for v in vols if not v.destroyed_ns]
    return {
        "pool": {
            "provisioned_bytes": st.provisioned_bytes,
            "logical_bytes": st.logical_bytes,
            "unique_bytes": st.unique_bytes,
            "stored_bytes": st.stored_bytes,
            "allocated_bytes": st.allocated_bytes,
            "dedupe_saved_bytes": st.logical_bytes - st.unique_bytes,
            "compression_saved_bytes": st.unique_bytes - st.stored_bytes,
            "dedupe_ratio": _ratio(st.logical_bytes, st.unique_bytes),
            "compression_ratio": _ratio(st.unique_bytes, st.stored_bytes),
            "data_reduction_ratio": _ratio(st.logical_bytes, st.stored_bytes),
            "total_efficiency": _ratio(st.provisioned_bytes, st.stored_bytes),
            "stored_by": {k: round(x) for k, x in by.items()},
            "ingest": {
                "written_bytes": sum(v.stats.written_bytes for v in live),
                "zero_bytes": sum(v.stats.zero_bytes for v in live),
                "dedupe_bytes": sum(v.stats.dedupe_bytes for v in live),
                "new_chunk_bytes": sum(v.stats.unique_bytes for v in live),
                "new_chunk_stored_bytes": sum(v.stats.stored_bytes for v in live),
            },
        },
        "volumes": per_volume,
        "as_of": as_of,
        "exact": exact,
        "explanation": REDUCTION_EXPLANATION,
    }


REDUCTION_EXPLANATION = {
    "logical_bytes": "data currently held (mapped, non-zero 4 KiB blocks): by all volumes in the "
                     "pool row, by the live volume in a volume row",
    "unique_bytes": "logical data after dedupe: one copy of each distinct block; a volume's is its "
                    "share (each chunk's 4 KiB split evenly over its references)",
    "stored_bytes": "what the unique blocks take in segments after compression, record headers "
                    "included; a volume's is its share (each chunk's record split evenly over its "
                    "references), so the shares add up to the pool's (see stored_by)",
    "allocated_bytes": "segments in use, including space not yet reclaimed",
    "exclusive_bytes": "per volume: stored bytes of chunks only its live data references (trimming "
                       "all of it frees them)",
    "shared_bytes": "per volume: stored bytes of chunks its live data references that other "
                    "volumes, clones or its snapshots reference too, each counted whole",
    "snapshot_stored_bytes": "per volume: share of stored held by map entries only its snapshots see",
    "stored_by": "the pool's stored bytes by holder: live volumes, snapshots, destroyed (not yet "
                 "eradicated) volumes, and map entries being released in the background",
    "dedupe_saved_bytes": "logical - unique: space dedupe saves now",
    "compression_saved_bytes": "unique - stored: space compression saves now",
    "dedupe_ratio": "logical / unique",
    "compression_ratio": "unique / stored",
    "data_reduction_ratio": "logical / stored (zero removal not counted: zeros are not data)",
    "total_efficiency": "provisioned / stored: data reduction plus thin provisioning",
    "thin_provisioning_ratio": "per volume: provisioned / logical",
    "ingest": "cumulative counters since the volume was created (they never go down): "
              "written_bytes (blocks written, zeros and overwrites included), zero_bytes (all-zero "
              "blocks among them, stored as nothing), dedupe_bytes (blocks already in the pool), "
              "new_chunk_bytes (blocks that became new chunks), new_chunk_stored_bytes (what those "
              "took in segments), reduction_ratio (written / new_chunk_stored)",
    "as_of": "when the walk of the volumes' maps behind the volume rows and stored_by was made",
    "exact": "false when a volume shares more chunks than a walk counts exactly: exclusive_bytes "
             "is then a lower bound",
}


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


@router.get("/api/v1/analytics/capacity/history", tags=["analytics"],
            summary="Capacity samples (raw recent, hourly and daily averages older)")
async def capacity_history(ctx: Ctx) -> dict[str, Any]:
    rows = await ctx.running_analytics().capacity_history()
    return {"samples": [{"t": t, **r} for t, r in rows]}


@router.get("/api/v1/analytics/capacity/forecast", tags=["analytics"], responses=ERRORS,
            summary="Physical capacity forecast with prediction intervals and days until full")
async def capacity_forecast(
    ctx: Ctx,
    horizons: str = Query("7,30,90", max_length=400, pattern=HORIZONS_PATTERN, description=(
        "1-20 comma-separated horizons in days, each above 0 and at most 3650")),
    history: bool = Query(False, description="include the history series used"),
) -> dict[str, Any]:
    return await ctx.running_analytics().forecast([float(x) for x in horizons.split(",")], history)


@router.get("/api/v1/analytics/health", tags=["analytics"],
            summary="Backing device and engine health: status with reasons")
async def health(ctx: Ctx) -> dict[str, Any]:
    return await ctx.running_analytics().health()


@router.get("/api/v1/analytics/temperature", tags=["analytics"], responses=ERRORS,
            summary="Data temperature per volume: hot / warm / cold / frozen")
async def temperature(
    ctx: Ctx,
    hot_days: float | None = Query(None, gt=0, le=36500, description=(
        "age limit of hot data in days (default: the daemon's)")),
    warm_days: float | None = Query(None, gt=0, le=36500, description=(
        "age limit of warm data; at or below the hot limit, nothing is warm")),
    cold_days: float | None = Query(None, gt=0, le=36500, description=(
        "age limit of cold data; at or below the warm limit, nothing is cold")),
) -> dict[str, Any]:
    a = ctx.running_analytics()
    d = a.thresholds
    # each limit is taken alone, so any values are valid: a limit not above
    # the one before it leaves its class empty (reported as equal to it)
    hot = hot_days or d.hot_days
    warm = max(warm_days or d.warm_days, hot)
    th = Thresholds(hot, warm, max(cold_days or d.cold_days, warm))
    return await a.temperature(th)


@router.get("/api/v1/analytics/tiering/recommendations", tags=["analytics"],
            summary="Tiering recommendations with estimated savings")
async def tiering_list(ctx: Ctx) -> dict[str, Any]:
    a = ctx.running_analytics()
    return await ctx.call(a.tiering.recommendations)


@router.post("/api/v1/analytics/tiering/recommendations/{rec_id}/apply", tags=["analytics"],
             responses=ERRORS, summary="Apply a recommendation (may start a background job)")
async def tiering_apply(ctx: Ctx, rec_id: Annotated[str, Path(max_length=300)]) -> dict[str, Any]:
    a = ctx.running_analytics()
    return await ctx.call(a.tiering.apply, rec_id)
