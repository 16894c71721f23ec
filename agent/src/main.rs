#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    mcptrail::cli::main()
}
