//! The `spillway` binary: all behaviour lives in the library.

// mimalloc instead of glibc malloc: a proxied request makes about ten small allocations
// (header values, timers, buffers), and glibc's slow paths cost ~290 instructions per
// malloc/free pair there (measured with benches/callgrind.sh). Only the binary chooses the
// allocator, so the library stays usable with whatever allocator an embedder picks.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    spillway::cli::main()
}
