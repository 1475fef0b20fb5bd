//! `switchyard import-nginx` on the nginx files teams run: every directory in
//! `fixtures/nginx` holds an `nginx.conf` (with its includes), the expected `switchyard.yaml`
//! and the expected `notes.txt` (what was not converted, by file and line). The YAML must
//! validate. `UPDATE_GOLDEN=1` rewrites the expected files after an intended change (then
//! review the diff).

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use switchyard_config::nginx;

fn cases() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nginx");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("nginx.conf").exists())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 4, "fixtures missing in {}", dir.display());
    dirs
}

fn golden(path: &Path, got: &str) {
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(path, got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", path.display()));
    assert_eq!(got, want, "{} differs", path.display());
}

#[test]
fn imports_match_golden_files_and_validate() {
    for dir in cases() {
        let import = nginx::import_file(&dir.join("nginx.conf")).unwrap();
        let yaml = nginx::to_yaml(&import, Path::new("nginx.conf"));
        if let Err(e) = switchyard_config::parse(&yaml) {
            panic!(
                "{}: the import does not validate:\n{e}\n{yaml}",
                dir.display()
            );
        }
        // Relative certificate paths become absolute (from nginx.conf's directory).
        let yaml = yaml.replace(&format!("{}/", dir.display()), "");
        golden(&dir.join("switchyard.yaml"), &yaml);
        let notes: String = import
            .notes
            .iter()
            .map(|n| {
                let mut n = n.clone();
                n.file = n.file.strip_prefix(&dir).unwrap_or(&n.file).to_path_buf();
                format!("{n}\n")
            })
            .collect();
        golden(&dir.join("notes.txt"), &notes);
    }
}

/// The blue/green file: two upstreams, the live one chosen by an included `set`.
#[test]
fn blue_green_upstreams_become_pools_with_the_selected_color_active() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nginx/bluegreen");
    let cfg =
        switchyard_config::validate(nginx::import_file(&dir.join("nginx.conf")).unwrap().config)
            .unwrap();
    let app = cfg.upstream("app").unwrap();
    let pools: Vec<&str> = app.pools.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(pools, ["blue", "green"]);
    assert_eq!(app.active, "green");
    assert_eq!(app.passive.consecutive_failures, 3);
    // nginx: the longest prefix wins; switchyard: the first match. /api/ must come first, and
    // the default server's locations serve any host.
    let routes: Vec<(Option<String>, &str, &str)> = cfg
        .routes
        .iter()
        .map(|r| {
            (
                r.host.as_ref().map(|h| format!("{h:?}")),
                r.path_prefix.as_str(),
                r.upstream.as_str(),
            )
        })
        .collect();
    assert_eq!(routes.len(), 3, "{routes:?}");
    assert!(
        routes[0]
            .0
            .as_deref()
            .is_some_and(|h| h.contains("admin.example.com")),
        "{routes:?}"
    );
    assert_eq!((routes[1].1, routes[1].2), ("/api/", "app"));
    assert_eq!((routes[2].0.as_deref(), routes[2].1), (None, "/"));
    assert!(
        cfg.routes[0].strip_prefix,
        "proxy_pass http://admin_backend/ strips the prefix"
    );
}

/// Switching the included line switches the import's active color.
#[test]
fn the_included_color_decides() {
    let tmp = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nginx/bluegreen");
    std::fs::create_dir(tmp.path().join("conf.d")).unwrap();
    for f in ["nginx.conf", "conf.d/app.conf", "conf.d/admin.conf"] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    for color in ["blue", "green"] {
        std::fs::write(
            tmp.path().join("active_color.conf"),
            format!("set $backend app_{color};\n"),
        )
        .unwrap();
        let cfg = switchyard_config::validate(
            nginx::import_file(&tmp.path().join("nginx.conf"))
                .unwrap()
                .config,
        )
        .unwrap();
        assert_eq!(cfg.upstream("app").unwrap().active, color);
    }
    // Without the included file the variable is unknown: the locations are reported, not
    // guessed.
    std::fs::remove_file(tmp.path().join("active_color.conf")).unwrap();
    let import = nginx::import_file(&tmp.path().join("nginx.conf")).unwrap();
    let text: Vec<String> = import.notes.iter().map(|n| n.to_string()).collect();
    assert!(
        text.iter()
            .any(|n| n.contains("active_color.conf") && n.contains("cannot read")),
        "{text:#?}"
    );
    assert!(
        text.iter()
            .any(|n| n.contains(":15: `proxy_pass http://$backend`") && n.contains("variable")),
        "{text:#?}"
    );
}

#[test]
fn unreadable_and_broken_files_are_errors_with_their_line() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = nginx::import_file(&tmp.path().join("nope.conf"))
        .unwrap_err()
        .to_string();
    assert!(
        missing.contains("nope.conf") && missing.contains("cannot read"),
        "{missing}"
    );
    let f = tmp.path().join("bad.conf");
    std::fs::write(&f, "http {\n  server {\n    listen 80\n  }\n}\n").unwrap();
    let bad = nginx::import_file(&f).unwrap_err().to_string();
    assert!(
        bad.ends_with("bad.conf:3: directive \"listen\" is not terminated by \";\""),
        "{bad}"
    );
    // A file including itself stops with a note, not a stack overflow.
    std::fs::write(&f, "include bad.conf;\n").unwrap();
    let import = nginx::import_file(&f).unwrap();
    assert!(
        import
            .notes
            .iter()
            .any(|n| n.reason.contains("nested too deep")),
        "{:?}",
        import.notes
    );
}
