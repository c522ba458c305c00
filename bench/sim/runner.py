"""``moe-bench simulate``'s job: the model of ``sim.model`` swept over routers x workloads x G x
placements, recorded as ``results/<run_id>/sim.parquet`` (SIM_SCHEMA) with a meta.json of kind
``simulate``. Plans are routed once per router x workload and tiled over the devices.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from moe_routing_bench.bench.placement import check_spec
from moe_routing_bench.bench.record import (
    RunDir,
    atomic_write_table,
    check_out_dir,
    config_id_of,
    header,
    new_meta,
    recording,
)
from moe_routing_bench.bench.schema import HEADER
from moe_routing_bench.bench.sim.model import Hardware, ep_group_size, route_plans, simulate_step
from moe_routing_bench.bench.spec import DEFAULT, CapacityFactor, Notes, Spec, router_options
from moe_routing_bench.bench.timing import check_fits, routing_bytes
from moe_routing_bench.kernels.experts import ffn_width
from moe_routing_bench.routers.contract import RoutingError
from moe_routing_bench.routers.registry import build_router
from moe_routing_bench.workloads.registry import build_workload

SIM_TABLE = "sim.parquet"
SIM_SCHEMA = pa.schema(
    [
        *HEADER,
        ("router", pa.string()),
        ("router_name", pa.string()),
        ("workload", pa.string()),
        ("devices", pa.int64()),
        ("nodes", pa.int64()),
        ("devices_per_node", pa.int64()),
        ("ep_size", pa.int64()),
        ("placement", pa.string()),
        ("experts", pa.int64()),
        ("tokens_per_device", pa.int64()),
        ("top_k", pa.float64()),
        ("capacity_factor", pa.float64()),
        ("capacity", pa.int64()),
        ("hidden", pa.int64()),
        ("ffn", pa.int64()),
        ("dtype", pa.string()),
        ("plans", pa.int64()),
        ("tokens_dropped_frac", pa.float64()),
        ("step_time_s", pa.float64()),
        ("a2a_dispatch_s", pa.float64()),
        ("a2a_combine_s", pa.float64()),
        ("compute_max_s", pa.float64()),
        ("compute_mean_s", pa.float64()),
        ("straggler", pa.float64()),
        ("load_ratio", pa.float64()),
        ("max_device_load", pa.float64()),
        ("mean_device_load", pa.float64()),
        ("bytes_total", pa.float64()),
        ("bytes_inter_node", pa.float64()),
        ("intra_bw_GBps", pa.float64()),
        ("intra_lat_us", pa.float64()),
        ("inter_bw_GBps", pa.float64()),
        ("inter_lat_us", pa.float64()),
        ("peak_tflops", pa.float64()),
        ("mem_bw_TBps", pa.float64()),
    ]
)


@dataclasses.dataclass(frozen=True)
class SimSweep:
    """What to simulate: routers x workloads x device counts x placements, one model size."""

    routers: list[Spec]
    workloads: list[Spec]
    devices: list[int]
    placements: list[str]
    experts: int
    tokens: int
    hidden: int
    ffn_ratio: float
    dtype: str
    hw: Hardware
    plans: int = 8
    seed: int = 0
    ep_size: int | None = None
    top_k: int | None = None
    capacity_factor: CapacityFactor = DEFAULT
    ffn: int | None = None  # F outright (a model preset); None: round(ffn_ratio * hidden)
    ffn_kind: str = "swiglu"
    model: str | None = None

    def check(self) -> None:
        """Refuse an impossible configuration before routing anything."""
        for name, v in (
            ("experts", self.experts),
            ("tokens", self.tokens),
            ("hidden", self.hidden),
            ("plans", self.plans),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise RoutingError(f"--{name} must be an integer >= 1 (got {v!r})")
        if not self.ffn_ratio > 0:
            raise RoutingError(f"--ffn-ratio must be > 0 (got {self.ffn_ratio})")
        for p in self.placements:
            check_spec(p)
        for g in self.devices:
            s = ep_group_size(g, self.experts, self.ep_size)
            # Plans' logits, kept rows per device and expert, and the traffic pairs inside groups.
            need = routing_bytes(self.tokens, self.experts) + 16 * g * self.experts + 32 * g * s
            check_fits(need, f"--devices {g} x --experts {self.experts} (--tokens {self.tokens} per plan)", "cpu")
        for w in self.workloads:
            build_workload(w.name, w.opts, self.seed)


def simulate_rows(sweep: SimSweep, notes: Notes | None = None) -> list[dict[str, Any]]:
    """One row (without the run header) per router x workload x G x placement."""
    sweep.check()
    ffn = sweep.ffn or ffn_width(sweep.hidden, sweep.ffn_ratio)
    matrices = 3 if sweep.ffn_kind == "swiglu" else 2
    options = {}
    for spec in sweep.routers:  # a bad option is refused before anything is routed
        opts = router_options(
            spec,
            experts=sweep.experts,
            seed=sweep.seed,
            top_k=sweep.top_k,
            capacity_factor=sweep.capacity_factor,
            notes=notes,
        )
        build_router(spec.name, **opts)
        options[spec.label] = {k: v for k, v in opts.items() if k not in ("num_experts", "seed")}
    rows = []
    for spec in sweep.routers:
        for wl in sweep.workloads:
            n_plans = min(sweep.plans, max(sweep.devices))
            plans = route_plans(
                spec.name,
                options[spec.label],
                wl.name,
                wl.opts,
                sweep.tokens,
                sweep.experts,
                n_plans,
                sweep.seed,
                spec.label,
            )
            cf = build_router(spec.name, num_experts=sweep.experts, **options[spec.label]).config.capacity_factor
            for g in sweep.devices:
                for placement in sweep.placements:
                    cfg = {
                        "router": spec.label,
                        "router_opts": options[spec.label],
                        "workload": wl.label,
                        "devices": g,
                        "placement": placement,
                        "experts": sweep.experts,
                        "tokens_per_device": sweep.tokens,
                        "hidden": sweep.hidden,
                        "ffn": ffn,
                        "dtype": sweep.dtype,
                        "plans": sweep.plans,
                        "seed": sweep.seed,
                        "ep_size": sweep.ep_size,
                        "model": sweep.model,
                        "ffn_kind": sweep.ffn_kind,
                        "hardware": dataclasses.asdict(sweep.hw),
                    }
                    hw = sweep.hw
                    rows.append(
                        {
                            "config_json": json.dumps(cfg, sort_keys=True, default=str),
                            "router": spec.label,
                            "router_name": spec.name,
                            "workload": wl.label,
                            "placement": placement,
                            "devices_per_node": hw.devices_per_node,
                            "experts": sweep.experts,
                            "tokens_per_device": sweep.tokens,
                            "top_k": plans.top_k,
                            "capacity_factor": math.nan if cf is None else float(cf),
                            "capacity": plans.capacity,
                            "hidden": sweep.hidden,
                            "ffn": ffn,
                            "dtype": sweep.dtype,
                            "plans": int(plans.kept_BE.shape[0]),
                            "tokens_dropped_frac": plans.tokens_dropped_frac,
                            "intra_bw_GBps": hw.intra_bw,
                            "intra_lat_us": hw.intra_lat,
                            "inter_bw_GBps": hw.inter_bw,
                            "inter_lat_us": hw.inter_lat,
                            "peak_tflops": hw.flops,
                            "mem_bw_TBps": hw.mem_bw,
                            **simulate_step(
                                plans, g, placement, sweep.hidden, ffn, sweep.dtype, hw, sweep.ep_size, matrices
                            ),
                        }
                    )
    return rows


def simulate_run(
    sweep: SimSweep, out_dir: Path | None, notes: Notes | None = None, **fields: Any
) -> tuple[list[dict[str, Any]], RunDir | None, float]:
    """``moe-bench simulate``: (rows, the run directory or None when ``out_dir`` is None, seconds).
    --out is checked before anything is routed; the run directory is written once the rows exist
    (a failed write makes it ``failed``)."""
    if out_dir is not None:
        check_out_dir(out_dir)
    t0 = time.perf_counter()
    rows = simulate_rows(sweep, notes)
    seconds = time.perf_counter() - t0
    run = None if out_dir is None else write_sim_run(out_dir, sweep, rows, seconds=seconds, **fields)
    return rows, run, seconds


def write_sim_run(out_dir: Path, sweep: SimSweep, rows: list[dict[str, Any]], **fields: Any) -> RunDir:
    """A run directory of kind ``simulate``: meta.json and sim.parquet."""
    run = RunDir.create(out_dir)
    meta = new_meta("simulate", run.run_id, "cpu", hardware=dataclasses.asdict(sweep.hw), rows=len(rows), **fields)
    with recording(run, meta):
        full = [{**header(meta, config_id_of(r["config_json"]), sweep.seed, r["config_json"]), **r} for r in rows]
        atomic_write_table(run.path / SIM_TABLE, pa.Table.from_pylist(full, schema=SIM_SCHEMA))
    return run


def load_sim(path: str | Path) -> pd.DataFrame:
    """The ``sim.parquet`` table of a simulate run, as a DataFrame."""
    return pq.read_table(Path(path) / SIM_TABLE).to_pandas()
