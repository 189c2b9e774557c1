//! `polyhead-server`: loads one model set and serves it over gRPC.

use polyhead_server::Config;
use polyhead_server::telemetry::Telemetry;

fn main() -> std::process::ExitCode {
    polyhead_server::engine::disable_runtime_telemetry();
    let config = match polyhead_server::config_layers::parse(std::env::args_os()) {
        Ok(config) => config,
        Err(e) => e.exit(),
    };
    if config.print_config {
        print!("{}", polyhead_server::config_layers::render(&config));
        return std::process::ExitCode::SUCCESS;
    }
    // Before the runtime starts its threads, so that the cap holds for all of them.
    let arenas_capped = polyhead_server::heap::limit_arenas(config.malloc_arenas);
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(run(config, arenas_capped)),
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(config: Config, arenas_capped: bool) -> std::process::ExitCode {
    let telemetry = match Telemetry::init(&config.telemetry, config.log_format).await {
        Ok(telemetry) => telemetry,
        Err(e) => {
            tracing::error!("{e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    tracing::debug!(
        arenas = config.malloc_arenas,
        capped = arenas_capped,
        "malloc arenas"
    );
    if let Err(e) = config.validate() {
        tracing::error!("invalid configuration: {e}");
        return std::process::ExitCode::from(2);
    }
    let code = match serve(&config).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    };
    telemetry.shutdown().await;
    code
}

async fn serve(config: &Config) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    polyhead_server::run(config, listener, shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {}
        () = terminate => {}
    }
    tracing::info!("shutdown signal received; finishing in-flight calls");
}
