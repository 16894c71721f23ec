//! Empty library target: it lets host tools (`cargo check`, clippy, rust-analyzer) see the crate.
//! The programs live in `main.rs`, which only builds for the BPF target.
#![no_std]
