//! `weir-cni`: Weir's CNI plugin (SPEC 1.1). The runtime runs it with CNI_* environment
//! variables and the network configuration on stdin; it answers on stdout (a result, or the
//! spec's error object with a non-zero exit) and logs one line per call to its log file.

mod agent;
mod commands;
mod config;
mod error;
mod log;
mod netlink;
mod result;

use std::{
    io::{Read as _, Write as _},
    path::PathBuf,
    process::ExitCode,
    time::Instant,
};

use serde_json::Value;

use crate::{
    config::{Command, Env, LATEST_VERSION, SUPPORTED_VERSIONS},
    error::PluginError,
    result::{CniResult, ErrorResult, VersionResult},
};

/// What a successful call prints.
enum Output {
    Result(CniResult),
    Version(VersionResult),
    Nothing,
}

/// The context a failure is reported in.
#[derive(Default)]
struct Ctx {
    command: Option<Command>,
    cni_version: Option<String>,
    log_file: Option<PathBuf>,
    env: Env,
    note: Option<String>,
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

fn run(ctx: &mut Ctx) -> Result<Output, PluginError> {
    let command = config::command()?;
    ctx.command = Some(command);
    let mut stdin = Vec::new();
    std::io::stdin()
        .read_to_end(&mut stdin)
        .map_err(|source| PluginError::Io {
            what: "reading the network configuration from stdin".into(),
            source,
        })?;
    if command == Command::Version {
        let asked = serde_json::from_slice::<Value>(&stdin)
            .ok()
            .and_then(|v| {
                v.get("cniVersion")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
            .unwrap_or_else(|| LATEST_VERSION.to_owned());
        return Ok(Output::Version(VersionResult {
            cni_version: asked,
            supported_versions: SUPPORTED_VERSIONS.iter().map(|&v| v.to_owned()).collect(),
        }));
    }
    // The version and log file are wanted for the error report even if the rest is invalid.
    if let Ok(v) = serde_json::from_slice::<Value>(&stdin) {
        ctx.cni_version = v
            .get("cniVersion")
            .and_then(Value::as_str)
            .filter(|v| SUPPORTED_VERSIONS.contains(v))
            .map(str::to_owned);
        ctx.log_file = v.get("logFile").and_then(Value::as_str).map(PathBuf::from);
    }
    let conf = config::parse_netconf(&stdin)?;
    ctx.env = config::env(command)?;
    let env = &ctx.env;
    match command {
        Command::Add => Ok(Output::Result(commands::add(&conf, env)?)),
        Command::Del => {
            ctx.note = commands::del(&conf, env)?;
            Ok(Output::Nothing)
        }
        Command::Check => commands::check(&conf, env).map(|()| Output::Nothing),
        Command::Status => commands::status(&conf).map(|()| Output::Nothing),
        Command::Gc => {
            ctx.note = Some(commands::gc(&conf)?);
            Ok(Output::Nothing)
        }
        Command::Version => unreachable!("answered above"),
    }
}

fn main() -> ExitCode {
    let started = Instant::now();
    let mut ctx = Ctx::default();
    // Panics are reported as the spec's error object, not as a backtrace the runtime drops.
    std::panic::set_hook(Box::new(|_| {}));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&mut ctx)))
        .unwrap_or_else(|panic| Err(PluginError::Panic(panic_message(&panic))));
    let cni_version = ctx
        .cni_version
        .clone()
        .unwrap_or_else(|| LATEST_VERSION.to_owned());
    let mut stdout = std::io::stdout().lock();
    let printed = match &outcome {
        Ok(Output::Result(r)) => Some(serde_json::to_string(r)),
        Ok(Output::Version(v)) => Some(serde_json::to_string(v)),
        Ok(Output::Nothing) => None,
        Err(e) => Some(serde_json::to_string(&ErrorResult {
            cni_version,
            code: e.code(),
            msg: e.to_string(),
            details: e.details(),
        })),
    };
    if let Some(Ok(json)) = printed {
        let _ = writeln!(stdout, "{json}");
    }
    let (code, logged) = match outcome {
        Ok(_) => (
            ExitCode::SUCCESS,
            ctx.note.clone().unwrap_or_else(|| "ok".into()),
        ),
        Err(e) => (
            ExitCode::FAILURE,
            format!("error code={} {}", e.code(), e.details()),
        ),
    };
    let _ = stdout.flush();
    if ctx.command != Some(Command::Version) {
        let log_file = ctx
            .log_file
            .clone()
            .unwrap_or_else(|| PathBuf::from(config::DEFAULT_LOG_FILE));
        log::line(
            &log_file,
            ctx.command.map_or("?", Command::as_str),
            &ctx.env.container_id,
            &ctx.env.ifname,
            started,
            &logged,
        );
    }
    code
}
