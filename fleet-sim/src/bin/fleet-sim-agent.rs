// The `volume-agent` binary's own `main.rs`, built inside this package so the scenarios
// test starts real agents through `CARGO_BIN_EXE_fleet-sim-agent` (same cargo
// invocation, no nested build).
include!("../../../agent/src/main.rs");
