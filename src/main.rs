//! muvee-agent: the build and deploy agent of the muvee PaaS.
//! Layout, top down: cli/config/check/run_task (entry) → cp (control plane: the agent loop,
//! client, wire, journal/outbox, log shipping) → work (dispatch, roles, datasets) → sys
//! (executor, docker/git/rsync, signals, redaction). Modules only use modules below them.

mod check;
mod cli;
mod config;
mod cp;
mod run_task;
mod sys;
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
        None | Some(cli::Sub::Run(_)) => match cp::agent::run(cfg) {
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

/// Logs go to stderr (stdout is run-task's result), every message scrubbed of secrets.
/// MUVEE_LOG takes env_logger filters; ureq is held at info because its traces show headers.
fn init_logging(verbose: bool) {
    let mut b = env_logger::Builder::new();
    b.filter_level(if verbose {
        log::LevelFilter::Debug
    } else {
        log::LevelFilter::Info
    });
    if let Ok(spec) = std::env::var("MUVEE_LOG") {
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
