"""Presets, sweeps, reports, device-spec export, benchmarks and the `ept-hw` CLI."""
