use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    handoff::run(handoff::Cli::parse()).await
}
