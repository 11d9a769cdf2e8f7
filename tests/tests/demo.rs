//! The README's first command: `volume-agent demo` runs the whole loop on embedded
//! defaults and shows the chain destroyed child first.

use std::process::Command;

#[test]
fn demo_destroys_the_chain_child_first_and_shows_metrics() {
    let out = Command::new(e2e::agent_binary())
        .arg("demo")
        .env("RUST_LOG", "info")
        .output()
        .expect("run volume-agent demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    let pos = |h: &str| {
        stderr
            .find(&format!("destroyed volume handle={h} "))
            .unwrap_or_else(|| panic!("no destroy line for {h}:\n{stderr}"))
    };
    assert!(pos("grandchild") < pos("child") && pos("child") < pos("base"));
    assert!(stdout.contains("volume_agent_destroys_total 3"), "{stdout}");
    assert!(stdout.contains("left on the worker"), "{stdout}");
}
