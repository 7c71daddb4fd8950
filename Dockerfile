# The kpx image: `docker build -t kpx:0.1.0 .` from the repository root.
#
# Build stage: the same bootstrap as a developer machine (`cargo xtask build`
# installs rust-src and bpf-linker against the nightly toolchain's LLVM,
# then builds the agent with its embedded eBPF datapath, release profile).
FROM rust:1.95-slim-bookworm AS build
RUN rustup toolchain install nightly --profile minimal --component rust-src
WORKDIR /src
COPY . .
RUN cargo xtask build && install -D target/release/kpx /out/kpx

# Run stage: the binary, plus iptables, nftables, ipset, ipvsadm and
# iproute2 for `--cleanup-kube-proxy` / `kpx cleanup --kube-proxy` (kube-
# proxy's rules, and IPVS mode's interface, sets and virtual services; kpx
# itself installs no rule).
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables nftables ipset ipvsadm iproute2 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/kpx /usr/local/bin/kpx
ENTRYPOINT ["/usr/local/bin/kpx"]
CMD ["agent", "--help"]
