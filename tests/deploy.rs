//! The operator bundle, read by the tools that will read it in production:
//! the systemd units by `systemd-analyze verify`, with their programs
//! pointed at this build and the test virtualenv's Gunicorn; the alert rules
//! by `promtool`; the compose file by `docker-compose config`.

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
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "service" || e == "socket")
        })
        .collect();
    assert_eq!(units.len(), 5, "{units:?}");
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
        ("gatehouse-db.service", "RuntimeDirectoryPreserve=yes"),
        (
            "gatehouse-db.socket",
            "ListenStream=/run/gatehouse/.s.PGSQL.6432",
        ),
        ("gatehouse-db.socket", "SocketGroup=www-data"),
        ("gatehouse-proxy.socket", "ListenStream=0.0.0.0:80"),
    ] {
        let text = std::fs::read_to_string(repo().join("deploy/systemd").join(unit)).unwrap();
        assert!(text.contains(needs), "{unit}: {needs}");
    }
}

/// `tool args…` succeeds; what it said otherwise.
fn run(tool: &str, package: &str, args: &[&str], dir: &std::path::Path) -> String {
    let out = Command::new(tool)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{tool}: {e}: install it (apt-get install {package})"));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{tool} {args:?}: {said}");
    said
}

#[test]
fn alert_rules_pass_promtool() {
    let said = run(
        "promtool",
        "prometheus",
        &["check", "rules", "prometheus/alerts.yml"],
        &repo().join("docker"),
    );
    assert!(said.contains("SUCCESS: 11 rules found"), "{said}");
    run(
        "promtool",
        "prometheus",
        &[
            "check",
            "config",
            "--syntax-only",
            "prometheus/prometheus.yml",
        ],
        &repo().join("docker"),
    );
}

/// No engine runs here: the compose file is checked as docker-compose reads
/// it, and every file it mounts must exist.
#[test]
fn compose_file_is_valid_and_mounts_what_exists() {
    let docker = repo().join("docker");
    run(
        "docker-compose",
        "docker-compose",
        &["-f", "docker-compose.yml", "config", "-q"],
        &docker,
    );
    let config = run(
        "docker-compose",
        "docker-compose",
        &["-f", "docker-compose.yml", "config"],
        &docker,
    );
    let mut mounts = 0;
    for line in config.lines() {
        // `- /repo/docker/…:/in/container:ro`: a bind mount, as `config`
        // resolves it.
        let Some(mount) = line.trim().strip_prefix("- ") else {
            continue;
        };
        if mount.starts_with(&*docker.to_string_lossy()) && mount.contains(':') {
            let source = mount.split(':').next().unwrap();
            assert!(
                std::path::Path::new(source).exists(),
                "compose mounts a missing file: {source}"
            );
            mounts += 1;
        }
    }
    assert!(mounts >= 8, "{config}");
    for service in [
        "postgres-primary",
        "postgres-replica",
        "redis",
        "db",
        "app",
        "proxy",
        "prometheus",
        "grafana",
    ] {
        assert!(config.contains(&format!("\n  {service}:\n")), "{service}");
    }
    // The configs the containers run with pass the binary's own check.
    run(
        env!("CARGO_BIN_EXE_gatehouse"),
        "gatehouse",
        &["check-config", "config/gateway.toml", "config/db.toml"],
        &docker,
    );
}
