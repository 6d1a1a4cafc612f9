//! The `spillway` binary: all behaviour lives in the library.

/// mimalloc instead of glibc malloc: every request allocates a little (headers, futures), and
/// mimalloc's thread-local free lists make those allocations cheaper and keep RSS flatter.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    spillway::cli::main()
}
