#![forbid(unsafe_code)]

/// jemalloc, not glibc's malloc, for the agent's own (Rust) allocations. With thousands of
/// idle keep-alive clients, glibc kept about 24 KiB of freed memory per connection resident:
/// the few long-lived objects of each connection pin pages that its buffers shared, and
/// `malloc_trim` returns only whole free pages. jemalloc groups allocations by size class,
/// so freed buffers empty whole slabs, which its background thread hands back after a second
/// (`.cargo/config.toml` sets the decay): 2,000 parked connections held 21 KiB each
/// against 31 KiB with glibc, 9,488 held 12.2 KiB against 22.6 KiB, measured (BENCHMARKS.md,
/// "Parked connections"). RocksDB's C++ still allocates through glibc, whose
/// free pages the agent trims periodically (`sys::release_free_heap`).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    mcptrail::cli::main()
}
