//! Ironmesh's BPF programs and the Rust mirrors of their map layouts.
//!
//! Programs are C under `ebpf/c/*.bpf.c`, compiled by `build.rs` with clang
//! into objects that the agent embeds and loads with aya. This crate owns
//! the shared map layouts (`#[repr(C)]` mirrors of `c/*.h`) and nothing that
//! touches the kernel. It holds no programs yet: the datapath issue adds
//! policy, service load balancing, rate limits and flow telemetry here.
