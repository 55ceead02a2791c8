//! Names the commit the binary was built from, for `roleproxy --version` and the
//! `roleproxy_build_info` metric: git's short hash (`-dirty` with uncommitted changes), else
//! `ROLEPROXY_COMMIT` (a build from a source archive or a package), else `unknown`.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=ROLEPROXY_COMMIT");
    let commit = git_commit()
        .or_else(|| {
            std::env::var("ROLEPROXY_COMMIT")
                .ok()
                .filter(|c| !c.is_empty())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=ROLEPROXY_COMMIT={commit}");
}

/// The short hash of HEAD, asking git for the files to watch: in a worktree `.git` is a file,
/// and HEAD, the branch's ref and the index live elsewhere.
fn git_commit() -> Option<String> {
    let hash = git(&["rev-parse", "--short", "HEAD"])?;
    for path in ["HEAD", "index", "packed-refs"] {
        if let Some(file) = git(&["rev-parse", "--git-path", path]) {
            println!("cargo:rerun-if-changed={file}");
        }
    }
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        if let Some(file) = git(&["rev-parse", "--git-path", &branch]) {
            println!("cargo:rerun-if-changed={file}");
        }
    }
    // An edit makes the build dirty without touching git's files.
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=Cargo.toml");
    // Tracked files that differ from HEAD; untracked files do not make a build dirty.
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some();
    Some(if dirty { format!("{hash}-dirty") } else { hash })
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (out.status.success() && !text.is_empty()).then(|| text.to_owned())
}
