//! Logging: human-readable by default, JSON lines when `LOG_FORMAT=json`.

use tracing_subscriber::EnvFilter;

pub fn init() {
    // aws-config warns at every start on machines without instance metadata
    // (it probes IMDS for a default region, which clusters set themselves).
    let filter = EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,aws_config::imds=error"));
    let json = std::env::var("LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
