//! `treadle`: inspect a treadle database and act on its work items, while
//! engines in other processes (on other machines, with PostgreSQL) keep
//! running the pipeline. `--db` is a SQLite file or a `postgres://` URL
//! (with `--schema NAME`, default `treadle`).
//!
//! ```text
//! treadle --db PATH status [ITEM]                  counts per stage and state, or one item in full
//! treadle --db PATH items --stage S --state STATE  ids of the items whose stage S is in STATE
//! treadle --db PATH review list                    stages awaiting review, with details
//! treadle --db PATH approve ITEM STAGE --by NAME [--note TEXT] [--round N] [--edits FILE.json]
//! treadle --db PATH reject ITEM STAGE --by NAME --reason TEXT [--note TEXT] [--round N]
//! treadle --db PATH retry ITEM STAGE               run a failed stage again
//! treadle --db PATH rerun ITEM STAGE               run a finished stage and everything after it again
//! treadle --db PATH cancel ITEM                    cancel an item
//! treadle --db PATH events [ITEM] [--after SEQ] [--limit N] [--follow]
//! treadle --db PATH prune --finished-before AGE    remove items finished before AGE ago (30d, 12h)
//! treadle --db PATH graph [--format dot|mermaid] [--counts]
//! ```
//!
//! `--json` prints one JSON document on stdout instead of text (with
//! `events --follow`, one JSON event per line). Read commands (`status`,
//! `items`, `review list`, `events`, `graph`) open a SQLite database
//! read-only and take no lock, so they answer at once while workers write.
//! The database is never created: a path that does not exist, a file that
//! is not a treadle database, or a PostgreSQL schema no worker has set up,
//! is an error.
//!
//! # Exit codes
//!
//! | code | meaning |
//! |------|---------|
//! | 0 | success |
//! | 1 | any other error (I/O, SQLite, a corrupt stored value) |
//! | 2 | usage error: bad arguments (a blank `--by` or `--reason`, the reserved deadline reviewer), an unknown state name, an unreadable `--edits` file |
//! | 3 | not found: no such item or stage |
//! | 4 | conflict: not awaiting review, a stale decision, not retryable or rerunnable, item cancelled |
//! | 5 | no usable database: missing, not a treadle database, a reset schema version, a newer schema (or an older one, for a read command) |
//!
//! On an error, one line on stderr says what was wrong, and nothing changes.

#![forbid(unsafe_code)]

mod cli;
mod commands;
mod db;
mod error;
mod output;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::Cli;
use crate::error::{CliError, Exit};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => return fail(&CliError::Output(error)),
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => Exit::Ok.into(),
        Err(CliError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => Exit::Ok.into(),
        Err(error) => fail(&error),
    }
}

/// Opens the database and runs the command on it.
async fn run(cli: Cli) -> Result<(), CliError> {
    let path = cli.db.ok_or(CliError::NoDatabaseGiven)?;
    let stdout = std::io::stdout();
    let ctrl_c = async {
        // If the handler cannot be installed, Ctrl-C still ends the process.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let out = &mut stdout.lock();
    match db::postgres_url(&path) {
        Some(url) => {
            let store = db::open_postgres(url, &cli.schema).await?;
            commands::run(&store, cli.command, cli.json, out, ctrl_c).await
        }
        None => {
            let store = if cli.command.only_reads() {
                db::open_read_only(&path).await?
            } else {
                db::open(&path).await?
            };
            commands::run(&store, cli.command, cli.json, out, ctrl_c).await
        }
    }
}

/// Prints `error` on one line of stderr and returns its exit code.
fn fail(error: &CliError) -> ExitCode {
    eprintln!("treadle: {error}");
    error.exit().into()
}
