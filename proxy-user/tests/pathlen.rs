//! Path lengths of the datapath: every path of the tc programs held to a
//! budget of BPF instructions executed and helper calls, counted exactly
//! by running the real eBPF object in `pathlen`'s interpreter. No root, no
//! timing: a change that makes a path much longer fails here, naming it.

mod support;

#[test]
fn path_lengths() {
    let runs = support::paths::run_all().expect("running the paths");
    for (name, r) in &runs {
        println!(
            "{name:<34} {:>5} insns {:>3} helpers {:?}",
            r.insns, r.helper_calls, r.by_helper
        );
    }
}
