//! muvee-agent: the build and deploy agent of the muvee PaaS.
//! Layers, top down; each uses only the layers below it:
//! entry (main, cli, config, check, run_task) → agent (the loop, workers, shutdown, periodic
//! reports, control channel: the one place that joins the client and the work) → work (what a
//! task does: roles, datasets, compose, lifecycle) and cp (the protocol client: HTTP, journal,
//! outbox, log shipping) side by side → task (the neutral task model) → sys (the host:
//! executor, docker/git/rsync, signals, redaction, waiting).

mod agent;
mod check;
mod cli;
mod config;
mod cp;
mod run_task;
mod sys;
mod task;
mod work;

use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: cli::Args = argh::from_env();
    if args.version {
        println!("muvee-agent {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    init_logging(args.verbose);
    sys::signal::install();
    let cfg = match config::Config::load(&args, &config::process_env) {
        Ok(c) => c,
        Err(e) => {
            log::error!("{e}");
            return ExitCode::from(2);
        }
    };
    let code = match &args.cmd {
        None | Some(cli::Sub::Run(_)) => match agent::run::run(cfg) {
            Ok(()) => 0,
            Err(e) => {
                log::error!("{e}");
                2
            }
        },
        Some(cli::Sub::RunTask(a)) => run_task::run(cfg, a),
        Some(cli::Sub::Check(_)) => check::run(&cfg),
    };
    ExitCode::from(code)
}

/// The log filter: `MUVEE_LOG` if set (the agent's own name, so a `RUST_LOG` exported for other
/// tools in the same shell does not change it), else `RUST_LOG`, as Rust tools read it.
fn log_filter_spec(muvee_log: Option<String>, rust_log: Option<String>) -> Option<String> {
    muvee_log
        .filter(|s| !s.trim().is_empty())
        .or(rust_log.filter(|s| !s.trim().is_empty()))
}

/// Logs go to stderr (stdout is run-task's result), every message scrubbed of secrets.
/// MUVEE_LOG or RUST_LOG take env_logger filters; ureq and rustls are held at info whatever the
/// filter says, because their traces show headers (the agent secret among them).
fn init_logging(verbose: bool) {
    let mut b = env_logger::Builder::new();
    b.filter_level(if verbose {
        log::LevelFilter::Debug
    } else {
        log::LevelFilter::Info
    });
    let spec = log_filter_spec(
        std::env::var("MUVEE_LOG").ok(),
        std::env::var("RUST_LOG").ok(),
    );
    if let Some(spec) = spec {
        b.parse_filters(&spec);
    }
    for m in ["ureq", "ureq_proto", "rustls"] {
        b.filter_module(m, log::LevelFilter::Info);
    }
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    b.format(move |buf, rec| {
        let msg = sys::redact::scrub(&rec.args().to_string()).into_owned();
        if journald {
            writeln!(buf, "{:<5} {msg}", rec.level())
        } else {
            writeln!(buf, "{} {:<5} {msg}", buf.timestamp_seconds(), rec.level())
        }
    });
    b.init();
}

#[cfg(test)]
mod tests {
    use super::log_filter_spec;

    fn spec(muvee: Option<&str>, rust: Option<&str>) -> Option<String> {
        log_filter_spec(muvee.map(String::from), rust.map(String::from))
    }

    #[test]
    fn rust_log_works_and_muvee_log_is_an_alias_that_wins() {
        assert_eq!(spec(None, None), None);
        assert_eq!(spec(None, Some("debug")).as_deref(), Some("debug"));
        assert_eq!(spec(Some("warn"), None).as_deref(), Some("warn"));
        assert_eq!(spec(Some("warn"), Some("debug")).as_deref(), Some("warn"));
        // An empty MUVEE_LOG does not hide RUST_LOG.
        assert_eq!(spec(Some(""), Some("debug")).as_deref(), Some("debug"));
    }
}
