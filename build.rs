//! Finds PostgreSQL's server programs for the tests that start a
//! throwaway PostgreSQL of their own. With them, the tests are built with
//! `cfg(csm_postgres)` and told where the programs are; without them
//! those tests are left out (with a test that says so), unless
//! `CSM_REQUIRE_POSTGRES=1`, as in CI, makes their absence an error.

use std::path::PathBuf;
use std::process::Command;

fn bindir() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("CSM_PG_BINDIR") {
        return Some(PathBuf::from(dir));
    }
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|dir| PathBuf::from(dir.trim()));
    // Debian keeps the server programs per major version.
    let newest_debian = || {
        let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|entry| {
                let entry = entry.ok()?;
                let version = entry.file_name().to_str()?.parse().ok()?;
                Some((version, entry.path().join("bin")))
            })
            .collect();
        dirs.sort();
        dirs.pop().map(|(_, dir)| dir)
    };
    from_pg_config
        .filter(|dir| dir.join("initdb").exists())
        .or_else(newest_debian)
}

fn main() {
    println!("cargo::rustc-check-cfg=cfg(csm_postgres)");
    println!("cargo::rerun-if-env-changed=CSM_REQUIRE_POSTGRES");
    println!("cargo::rerun-if-env-changed=CSM_PG_BINDIR");
    println!("cargo::rerun-if-env-changed=PATH");
    let found = bindir().filter(|dir| dir.join("initdb").exists() && dir.join("pg_ctl").exists());
    match found {
        Some(dir) => {
            println!("cargo::rustc-cfg=csm_postgres");
            println!("cargo::rustc-env=CSM_PG_BINDIR={}", dir.display());
        }
        None if std::env::var("CSM_REQUIRE_POSTGRES").as_deref() == Ok("1") => {
            panic!(
                "CSM_REQUIRE_POSTGRES=1 but no PostgreSQL server programs were found \
                 (pg_config --bindir, or CSM_PG_BINDIR)"
            );
        }
        None => {}
    }
}
