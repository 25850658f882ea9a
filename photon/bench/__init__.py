"""Benchmarks: each measures Photon against a baseline run in the same invocation and reports the ratio;
imported by the CLI alone."""
