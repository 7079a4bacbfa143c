"""`top`: pool readiness per flavor, claim hit ratio and latency, and boot-phase p50/p90/p99 from /metrics."""

from __future__ import annotations

import click

from service.cli import output, promtext
from service.cli.commands.common import app

PHASES = ("vmm_setup", "kernel", "init_to_agent", "total")
QUANTILES = (0.5, 0.9, 0.99)


def _pct(hits: float, total: float) -> str:
    return "-" if total <= 0 else f"{100.0 * hits / total:.0f}%"


def pool_rows(pools: list[dict], samples: dict) -> list[list]:
    claims = promtext.total_by(samples, "pclite_claims_total", ("flavor", "result"))
    claim_buckets = promtext.buckets_by(samples, "pclite_claim_seconds", ("flavor",))
    rows = []
    for pool in pools:
        flavor = pool.get("flavor")
        hits = claims.get((("flavor", flavor), ("result", "hit")), 0.0)
        total = sum(v for k, v in claims.items() if k[0] == ("flavor", flavor))
        buckets = claim_buckets.get((("flavor", flavor),))
        if buckets is None and len(claim_buckets) == 1 and (("flavor", ""),) in claim_buckets:
            buckets = None  # claim latency is not per flavor: shown in the summary line instead
        rows.append([flavor, f"{pool.get('ready', 0)}/{pool.get('target', 0)}", pool.get("booting", 0),
                     pool.get("claimed", 0), pool.get("state"), int(total), _pct(hits, total),
                     output.seconds_as_ms(promtext.histogram_quantile(0.5, buckets or [])),
                     output.seconds_as_ms(promtext.histogram_quantile(0.99, buckets or []))])
    return rows


def phase_rows(samples: dict) -> list[list]:
    by = promtext.buckets_by(samples, "pclite_boot_phase_seconds", ("flavor", "phase"))
    order = {p: i for i, p in enumerate(PHASES)}
    rows = []
    for key in sorted(by, key=lambda k: (k[0][1], order.get(k[1][1], 99), k[1][1])):
        buckets = by[key]
        count = buckets[-1][1] if buckets else 0
        if not count:
            continue
        rows.append([key[0][1], key[1][1], int(count)]
                    + [output.seconds_as_ms(promtext.histogram_quantile(q, buckets)) for q in QUANTILES])
    return rows


def summary_line(samples: dict) -> str:
    states = promtext.total_by(samples, "pclite_vms", ("state",))
    parts = [f"{k[0][1]} {int(v)}" for k, v in sorted(states.items()) if v]
    crashes = sum(v for _, v in samples.get("pclite_vmm_crashes_total", []))
    claim = promtext.buckets_by(samples, "pclite_claim_seconds", ())
    line = "VMs: " + (", ".join(parts) if parts else "none")
    if claim.get(()):
        line += (f"   claims p50 {output.seconds_as_ms(promtext.histogram_quantile(0.5, claim[()]))}"
                 f" p99 {output.seconds_as_ms(promtext.histogram_quantile(0.99, claim[()]))}")
    return line + f"   VMM crashes: {int(crashes)}"


@click.command("top", short_help="Pool readiness, claims and boot-phase percentiles.")
def top() -> None:
    """Pool readiness, claim hit ratio and latency, and boot-phase percentiles (from pclited's /metrics)."""
    client = app().client
    pools = client.list_pools()
    samples = promtext.parse(client.metrics())
    click.echo(summary_line(samples))
    click.echo()
    if pools:
        output.print_table(["POOL", "READY", "BOOTING", "CLAIMED", "STATE", "CLAIMS", "HIT", "CLAIM-P50",
                            "CLAIM-P99"], pool_rows(pools, samples))
    else:
        click.echo("No pools: create a flavor with `pclitectl apply -f FILE`.")
    click.echo()
    rows = phase_rows(samples)
    if rows:
        output.print_table(["FLAVOR", "PHASE", "BOOTS", "P50", "P90", "P99"], rows)
    else:
        click.echo("No boots measured yet.")
