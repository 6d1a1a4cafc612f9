//! The `spillway` binary: all behaviour lives in the library.

fn main() -> std::process::ExitCode {
    spillway::cli::main()
}
