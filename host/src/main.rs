//! The `dus` binary; everything happens in [`dusflow::cli`].

fn main() -> std::process::ExitCode {
    dusflow::cli::main()
}
