//! Link arguments for bpf-linker.

fn main() {
    // bpf-linker asks LLVM to expand memcpy "in order" by default, which
    // leaves every memset and memmove (a zeroed 16-byte field, a copied
    // IPv6 address) a call to the BPF target's byte-wise loop. Without it
    // LLVM expands all three inline, as loads and stores.
    println!("cargo:rustc-link-arg=--disable-expand-memcpy-in-order");
}
