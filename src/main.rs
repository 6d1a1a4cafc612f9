//! The `spillway` binary: all behaviour lives in the library.

#[global_allocator]
static GLOBAL: spillway::alloc::Mimalloc = spillway::alloc::Mimalloc;

fn main() -> std::process::ExitCode {
    spillway::cli::main()
}
