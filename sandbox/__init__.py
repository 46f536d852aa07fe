"""The simulators behind `podsettle sandbox`, `Engine.sandbox()` and the tests: no network needed.

A Purple Flea-compatible escrow server backed by the local ledger, a RunPod serverless emulator
with its worker runtime and built-in handlers, in-process compute, and the app that serves both
over real loopback HTTP. They implement the services' contracts, so the production adapters talk
to them unchanged; nothing in the engine imports them (only `podsettle.bootstrap` and the CLI).
"""
