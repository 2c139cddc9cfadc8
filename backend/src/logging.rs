//! Logging: `tracing` events (ours and thinpool's, and the `log` records of dependencies),
//! one line each on stderr.
//!
//! The filter is `RUST_LOG` when it is set. Otherwise it is the command's default (`info` for
//! `serve`, `warn` for the offline commands) until a configuration file is read, and then the
//! file's `logging.level`. The configuration is parsed well after start-up, so the filter sits
//! behind a reload handle rather than waiting: errors from argument parsing and config loading
//! are still printed.

use std::io::IsTerminal;
use std::sync::OnceLock;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter, Registry};

/// Set only when the filter did not come from `RUST_LOG` (which always wins).
static RELOAD: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Installs the subscriber. `default_level` applies when `RUST_LOG` is unset or empty.
pub fn init(default_level: &str) {
    let env = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.trim().is_empty());
    let (filter, from_env) = match env.as_deref().map(EnvFilter::try_new) {
        Some(Ok(f)) => (f, true),
        Some(Err(e)) => {
            // Like env_logger before: a bad RUST_LOG is reported, not fatal.
            eprintln!("vhost-thin: ignoring RUST_LOG: {e}");
            (EnvFilter::new(default_level), false)
        }
        None => (EnvFilter::new(default_level), false),
    };
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    // try_init: a second initialisation (tests calling into the library) is harmless.
    if Registry::default()
        .with(filter)
        .with(fmt)
        .try_init()
        .is_ok()
        && !from_env
    {
        let _ = RELOAD.set(handle);
    }
}

/// Applies the configuration's `logging` section, unless `RUST_LOG` decided.
pub fn apply_config(logging: Option<&vmm_config::LoggingConfig>) {
    let (Some(l), Some(handle)) = (logging, RELOAD.get()) else {
        return;
    };
    let level = match l.level {
        vmm_config::LogLevel::Error => "error",
        vmm_config::LogLevel::Warn => "warn",
        vmm_config::LogLevel::Info => "info",
        vmm_config::LogLevel::Debug => "debug",
        vmm_config::LogLevel::Trace => "trace",
    };
    if let Err(e) = handle.reload(EnvFilter::new(level)) {
        tracing::warn!("cannot apply the configured log level {level}: {e}");
    }
}
