//! The `vigil` command: parse the command line, start tracing, load the configuration,
//! dispatch. Everything else lives in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vigil::config::{Config, Overrides};
use vigil::scenario::load_dir;
use vigil::startup::Application;
use vigil::store::Store;

#[derive(Parser)]
#[command(
    name = "vigil",
    version,
    about = "Role-play crisis conversations with AI models and rate every answer against clinical safety criteria."
)]
struct Cli {
    /// Configuration file [default: ./vigil.toml if present]
    #[arg(long, global = true, env = "VIGIL_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080]
    #[arg(long, global = true, env = "VIGIL_BIND")]
    bind: Option<SocketAddr>,
    /// sqlite://path or postgres://... [default: sqlite://data/vigil.db; also read from DATABASE_URL]
    #[arg(long, global = true, env = "VIGIL_DATABASE_URL")]
    database_url: Option<String>,
    /// Scenario directory [default: scenarios]
    #[arg(long, global = true, env = "VIGIL_SCENARIOS")]
    scenarios: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the web interface, the API and the WebSocket (the default).
    Serve,
    /// Check scenario directories and run every criterion's examples.
    Lint {
        /// Scenario directories (or files: their directory is checked) [default: the configured one]
        paths: Vec<PathBuf>,
        /// Print this criterion in full and run its examples, showing every match.
        #[arg(long, value_name = "CRITERION")]
        explain: Option<String>,
        /// With --explain: the locale whose crisis resources a resource check uses.
        #[arg(long, requires = "explain")]
        locale: Option<String>,
        /// Print, per criterion, how many of its examples behave.
        #[arg(long)]
        stats: bool,
    },
    /// Apply the database migrations and exit.
    Migrate,
    /// Print the effective configuration, secrets masked.
    Config,
    /// Rate a labelled set of answers and compare with the labels: precision, recall and
    /// Cohen's kappa per criterion, and the answers where they disagree.
    Calibrate {
        /// Calibrate the rules (the regular-expression and resource checks).
        #[arg(long, required = true)]
        rules: bool,
        /// Labelled sets [default: every *.toml in the scenarios' calibration/ directory]
        #[arg(long = "set", value_name = "FILE")]
        sets: Vec<PathBuf>,
        /// List every answer where the verdict and the label differ.
        #[arg(long)]
        disagreements: bool,
    },
    /// The configured models.
    Targets {
        #[command(subcommand)]
        action: TargetsCommand,
    },
}

#[derive(Subcommand)]
enum TargetsCommand {
    /// Ask each target's server for its models and send it one tiny request with the target's
    /// settings; say what works. Exits 1 if a target cannot answer.
    Check {
        /// Only this target [default: every configured one]
        name: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let overrides = Overrides {
        bind: cli.bind,
        database_url: cli
            .database_url
            .or_else(|| std::env::var("DATABASE_URL").ok()),
        scenarios: cli.scenarios,
    };
    let config = match Config::load(cli.config.as_deref(), &overrides) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("vigil: configuration: {err}");
            return ExitCode::from(2);
        }
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::Lint {
            paths,
            explain,
            locale,
            stats,
        } => lint(&config, paths, explain.as_deref(), locale.as_deref(), stats),
        Command::Config => {
            print!("{}", config.to_masked_toml());
            // What the lists above come to once the server listens (port 0: whichever it gets).
            let port = config.server.bind.port();
            println!(
                "\n# Effective, with the server's own names:\n# Host names served: {}\n# WebSocket origins accepted: {}",
                config.server.served_hosts(port).join(", "),
                config.server.allowed_origins(port).join(", ")
            );
            ExitCode::SUCCESS
        }
        Command::Serve => run_async(serve(config)),
        Command::Migrate => run_async(migrate(config)),
        Command::Targets {
            action: TargetsCommand::Check { name },
        } => check_targets(&config, name.as_deref()),
        Command::Calibrate {
            rules: _,
            sets,
            disagreements,
        } => calibrate(&config, &sets, disagreements),
    }
}

fn calibrate(config: &Config, sets: &[PathBuf], disagreements: bool) -> ExitCode {
    use vigil::rating::calibrate;
    let started = std::time::Instant::now();
    let dir = &config.server.scenarios;
    let library = match load_dir(dir) {
        Ok(library) => library,
        Err(report) => {
            println!("{report}");
            return ExitCode::from(2);
        }
    };
    let run = calibrate::set_files(sets, &dir.join("calibration"))
        .and_then(|files| calibrate::load(&files).map(|answers| (files, answers)))
        .and_then(|(files, answers)| {
            calibrate::rules(&library, &answers).map(|report| (files, report))
        });
    match run {
        Ok((files, report)) => {
            print!("{}", report.render(disagreements));
            println!(
                "rules against {} labelled set file{} in {:.2} s",
                files.len(),
                if files.len() == 1 { "" } else { "s" },
                started.elapsed().as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("vigil: calibrate: {err}");
            ExitCode::from(2)
        }
    }
}

fn check_targets(config: &Config, name: Option<&str>) -> ExitCode {
    let targets = match vigil::target::Targets::from_config(&config.targets()) {
        Ok(targets) => targets,
        Err(err) => {
            eprintln!("vigil: targets: {err}");
            return ExitCode::from(2);
        }
    };
    let chosen: Vec<&vigil::target::Target> = match name {
        Some(name) => match targets.get(name) {
            Some(target) => vec![target],
            None => {
                let known: Vec<&str> = targets.names().collect();
                eprintln!(
                    "vigil: no target `{name}`; configured: {}",
                    known.join(", ")
                );
                return ExitCode::from(2);
            }
        },
        None => targets.iter().collect(),
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("vigil: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let mut failed = false;
    for target in chosen {
        let report = runtime.block_on(vigil::target::check::check(target, true));
        print!("{report}");
        failed |= report.worst() == vigil::target::check::Level::Fail;
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn init_tracing() {
    let spec = std::env::var("VIGIL_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .ok();
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(vigil::config::log_filter(spec.as_deref()))
        .with_ansi(colour)
        .with_writer(std::io::stderr)
        .init();
}

fn run_async(work: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("vigil: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("vigil: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let scenarios = config.server.scenarios.display().to_string();
    let database = vigil::config::mask_url_password(&config.server.database_url);
    let app = Application::build(config).await?;
    let shutdown = app.shutdown_token();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down: closing connections and saving sessions");
        shutdown.cancel();
    });
    let library = app.sessions().library();
    // Whether each server serves its model, in the background: it only warns.
    let configured = app.sessions().targets().clone();
    tokio::spawn(async move {
        for target in configured.iter() {
            let report = vigil::target::check::check(target, false).await;
            for finding in &report.findings {
                use vigil::target::check::Level;
                match finding.level {
                    Level::Warn | Level::Fail => {
                        tracing::warn!(name = %report.name, "{}", finding.text);
                    }
                    Level::Ok | Level::Note => {
                        tracing::debug!(name = %report.name, "{}", finding.text);
                    }
                }
            }
        }
    });
    let targets: Vec<&str> = app.sessions().targets().names().collect();
    tracing::info!(
        "Vigil listening on http://{} ({} scenarios from {scenarios}; targets: {}; database {database})",
        app.address(),
        library.scenarios.len(),
        targets.join(", "),
    );
    app.run_until_stopped().await
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn migrate(config: Config) -> anyhow::Result<()> {
    let store = Store::connect(&config.server.database_url).await?;
    store.migrate().await?;
    println!(
        "migrations applied to {}",
        vigil::config::mask_url_password(&config.server.database_url)
    );
    store.close().await;
    Ok(())
}

fn lint(
    config: &Config,
    paths: Vec<PathBuf>,
    explain: Option<&str>,
    locale: Option<&str>,
    stats: bool,
) -> ExitCode {
    let dirs: Vec<PathBuf> = if paths.is_empty() {
        vec![config.server.scenarios.clone()]
    } else {
        paths
            .into_iter()
            .map(|p| {
                if p.is_file() {
                    p.parent().map(PathBuf::from).unwrap_or_default()
                } else {
                    p
                }
            })
            .collect()
    };
    let mut failed = false;
    for dir in dirs {
        let library = match load_dir(&dir) {
            Ok(library) => library,
            Err(report) => {
                println!("{report}");
                failed = true;
                continue;
            }
        };
        for warning in &library.report.diagnostics {
            println!("{warning}");
        }
        let (versions, version_warnings) = check_versions(config, &library);
        let warnings = library.report.warnings() + version_warnings;
        let (criteria, examples) = vigil::lint::counts(&library);
        println!(
            "{}: {} scenarios, {criteria} criteria, {examples} examples run against their checks: ok ({} warning{}); {versions}",
            dir.display(),
            library.scenarios.len(),
            warnings,
            if warnings == 1 { "" } else { "s" },
        );
        if stats {
            print!("{}", vigil::lint::example_table(&library));
            // On answers the patterns were not written beside, when the directory has a set.
            let calibration = dir.join("calibration");
            if calibration.is_dir() {
                let figures = vigil::rating::calibrate::set_files(&[], &calibration)
                    .and_then(|files| vigil::rating::calibrate::load(&files))
                    .and_then(|answers| vigil::rating::calibrate::rules(&library, &answers));
                match figures {
                    Ok(report) => {
                        println!("\nOn the labelled set in {}:", calibration.display());
                        print!("{}", report.render(false));
                    }
                    Err(err) => {
                        println!("{}: {err}", calibration.display());
                        failed = true;
                    }
                }
            }
        }
        if let Some(id) = explain {
            match vigil::lint::explain(&library, id, locale) {
                Ok(explanation) => {
                    print!("{}", explanation.text);
                    if explanation.misbehaving > 0 {
                        failed = true;
                    }
                }
                Err(message) => {
                    eprintln!("vigil: {message}");
                    return ExitCode::from(2);
                }
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Compares the scenarios with the versions stored in the configured database, if there is
/// one: prints a warning for each scenario changed under an old `version`, and returns a word
/// on what was checked and how many warnings it printed. A missing SQLite file is not created
/// by linting.
fn check_versions(config: &Config, library: &vigil::scenario::Library) -> (String, usize) {
    let url = &config.server.database_url;
    let shown = vigil::config::mask_url_password(url);
    if let Some((path, _)) = vigil::store::sqlite_path(url)
        && !std::path::Path::new(path).exists()
    {
        return (
            format!("versions not compared: no database at {path} yet"),
            0,
        );
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => return (format!("versions not compared: {err}"), 0),
    };
    runtime.block_on(async {
        let store = match Store::connect(url).await {
            Ok(store) => store,
            Err(err) => return (format!("versions not compared: {err}"), 0),
        };
        let result = vigil::lint::version_warnings(library, &store).await;
        store.close().await;
        match result {
            Ok(warnings) => {
                for warning in &warnings {
                    println!("{warning}");
                }
                (
                    format!(
                        "versions compared with {shown}: {} changed without a new version",
                        warnings.len()
                    ),
                    warnings.len(),
                )
            }
            Err(err) => (format!("versions not compared: {err}"), 0),
        }
    })
}
