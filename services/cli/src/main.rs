use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    handoff::main(handoff::Cli::parse()).await
}
