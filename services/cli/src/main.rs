use clap::Parser;

// Services allocate many small values per event; mimalloc is markedly faster here.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    handoff::run(handoff::Cli::parse()).await
}
