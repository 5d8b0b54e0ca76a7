//! The operator bundle, read by the tools that will read it in production:
//! the systemd units by `systemd-analyze verify`, with their programs
//! pointed at this build and the test virtualenv's Gunicorn.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn systemd_units_verify_cleanly() {
    let venv = std::env::var_os("GATEHOUSE_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv"));
    let dir = tempfile::tempdir().unwrap();
    let units: Vec<PathBuf> = std::fs::read_dir(repo().join("deploy/systemd"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "service"))
        .collect();
    assert_eq!(units.len(), 3, "{units:?}");
    let mut copies = Vec::new();
    for unit in &units {
        let text = std::fs::read_to_string(unit)
            .unwrap()
            .replace("/usr/local/bin/gatehouse", env!("CARGO_BIN_EXE_gatehouse"))
            .replace("/srv/muejam/venv", &venv.display().to_string())
            .replace(
                "/srv/muejam/examples",
                &repo().join("examples").display().to_string(),
            );
        let copy = dir.path().join(unit.file_name().unwrap());
        std::fs::write(&copy, text).unwrap();
        copies.push(copy);
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&copies)
        .output()
        .expect("systemd-analyze is installed (apt-get install systemd)");
    let said = String::from_utf8_lossy(&out.stderr);
    // Unknown keys are only warnings: anything said is a failure.
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
    for (unit, needs) in [
        (
            "gatehouse-proxy.service",
            "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        ),
        (
            "gatehouse-proxy.service",
            "ExecReload=/bin/kill -HUP $MAINPID",
        ),
        ("gatehouse-db.service", "RuntimeDirectory=gatehouse"),
        ("gatehouse-db.service", "Group=www-data"),
    ] {
        let text = std::fs::read_to_string(repo().join("deploy/systemd").join(unit)).unwrap();
        assert!(text.contains(needs), "{unit}: {needs}");
    }
}
