//! Build script: records the git commit for the `redcloak_build_info`
//! metric (`BUILD_INFO_GIT_SHA` overrides it, for builds outside a checkout;
//! not `REDCLOAK_*`: cargo also sets it when running tests, and that prefix
//! is the configuration's).

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=BUILD_INFO_GIT_SHA");
    // The commit changes when HEAD moves or the branch it names does.
    if let Ok(head) = std::fs::read_to_string(".git/HEAD") {
        println!("cargo:rerun-if-changed=.git/HEAD");
        if let Some(branch) = head.trim().strip_prefix("ref: ") {
            let path = format!(".git/{branch}");
            if std::path::Path::new(&path).exists() {
                println!("cargo:rerun-if-changed={path}");
            }
        }
    }
    let sha = std::env::var("BUILD_INFO_GIT_SHA").ok().or_else(|| {
        let output = Command::new("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .output()
            .ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
    });
    if let Some(sha) = sha.filter(|s| !s.is_empty()) {
        println!("cargo:rustc-env=BUILD_INFO_GIT_SHA={sha}");
    }
}
