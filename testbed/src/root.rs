//! One policy for tests that need root and the kernel (BPF, network
//! namespaces, bpffs): they are marked `#[ignore = "needs root"]`, so a plain
//! `cargo test` reports them as ignored — never as passed — and
//! `cargo xtask test` runs them with `--include-ignored`. Once running, a
//! missing privilege or tool fails the test with the reason.

/// Fails the calling test unless this process is root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "this test needs root and the kernel (BPF, network namespaces): run it as root, e.g. with `cargo xtask test`"
    );
}

/// The value a root-only fixture built, or the test's failure with the reason.
pub fn built<T>(what: &str, r: anyhow::Result<T>) -> T {
    require_root();
    r.unwrap_or_else(|e| panic!("{what} could not be built: {e:#}"))
}
