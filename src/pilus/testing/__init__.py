"""Test helpers shipped with pilus (probes, conformance checks)."""
