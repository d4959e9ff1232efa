fn main() -> std::process::ExitCode {
    agentwall::cli::main()
}
