//! The `volume-agent` binary: a thin shell over the library.

fn main() -> anyhow::Result<()> {
    let arg = std::env::args().nth(1).unwrap_or_default();
    anyhow::bail!(
        "volume-agent {}: `{arg}` is not implemented yet in this build; the daemon is under construction",
        env!("CARGO_PKG_VERSION")
    )
}
