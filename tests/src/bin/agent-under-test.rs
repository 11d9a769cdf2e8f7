// The `volume-agent` binary's own `main.rs`, built inside this package so the end-to-end
// tests get it through `CARGO_BIN_EXE_*` from the same cargo invocation (same features,
// no nested cargo build).
include!("../../../agent/src/main.rs");
