//! The command line: every command, option and argument, parsed by clap.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// The exit codes, shown at the end of `treadle --help`.
const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  any other error (I/O, SQLite, a corrupt stored value)
  2  usage error: bad arguments (a blank --by or --reason, the reserved deadline
     reviewer), an unknown state name, an unreadable --edits file
  3  not found: no such item, or no such stage
  4  conflict: the stage is not awaiting review, the decision is stale, the stage
     is not retryable (or rerunnable), or the item is cancelled
  5  no usable database: the file is missing, is not a treadle database, its
     schema version was reset, or it was written by a newer treadle (or, for a
     read command, an older one: any write command migrates it)

On any error, one line on stderr says what was wrong, and nothing is changed.";

/// Inspect a treadle database and act on its work items.
///
/// Works on the SQLite database or PostgreSQL schema that treadle engines
/// share; other processes may be running the pipeline at the same time.
#[derive(Debug, Parser)]
#[command(name = "treadle", version, after_help = EXIT_CODES)]
pub struct Cli {
    /// The treadle database (required; never created: it must exist): a
    /// SQLite file, or a PostgreSQL server as `postgres://user@host/database`.
    #[arg(long, global = true, value_name = "PATH|URL")]
    pub db: Option<PathBuf>,

    /// The PostgreSQL schema the workers use (with a `postgres://` `--db`).
    #[arg(long, global = true, value_name = "NAME", default_value = "treadle")]
    pub schema: String,

    /// Print one JSON document on stdout instead of text (`events --follow`
    /// prints one JSON event per line).
    #[arg(long, global = true)]
    pub json: bool,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Counts of items per stage and state, or one item's full status.
    Status {
        /// Show this item: every stage with its attempts, timings, errors,
        /// subtasks and review.
        item: Option<String>,
    },

    /// The ids of the items whose stage is in a state.
    Items {
        /// The stage.
        #[arg(long)]
        stage: String,
        /// The state: pending, running, completed, failed, awaiting_review,
        /// skipped, retry_scheduled or cancelled.
        #[arg(long)]
        state: String,
    },

    /// Reviews waiting for a person.
    #[command(subcommand)]
    Review(ReviewCommand),

    /// Approve a stage awaiting review; it completes with its proposed output
    /// (or with the output in `--edits`).
    Approve {
        /// The item.
        item: String,
        /// The stage awaiting review.
        stage: String,
        /// The decision's details.
        #[command(flatten)]
        decision: DecisionArgs,
        /// A JSON file whose contents replace the stage's output.
        #[arg(long, value_name = "FILE.json")]
        edits: Option<PathBuf>,
    },

    /// Reject a stage awaiting review; it fails with the reason (and can be
    /// run again with `retry`).
    Reject {
        /// The item.
        item: String,
        /// The stage awaiting review.
        stage: String,
        /// The decision's details.
        #[command(flatten)]
        decision: DecisionArgs,
        /// Why it is rejected.
        #[arg(long)]
        reason: String,
    },

    /// Run a failed stage again (a fanned-out stage runs only its failed
    /// subtasks); a running worker picks it up.
    Retry {
        /// The item.
        item: String,
        /// The failed stage.
        stage: String,
    },

    /// Run a finished or failed stage again with every stage downstream of
    /// it, keeping their history (a review stage asks for a new review);
    /// a running worker picks it up.
    Rerun {
        /// The item.
        item: String,
        /// The completed, skipped or failed stage.
        stage: String,
    },

    /// Move unfinished items to the latest pipeline version, matching stages
    /// by name: completed stages stay completed, new stages start pending,
    /// stages the version lacks are dropped. Finished items and items with
    /// running work are left as they are.
    Migrate {
        /// The item to move.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        item: Option<String>,
        /// Move every unfinished item of an older version.
        #[arg(long)]
        all: bool,
    },

    /// Cancel an item: nothing more runs for it, and running stages stop.
    Cancel {
        /// The item.
        item: String,
    },

    /// The event log: every committed transition, oldest first.
    Events {
        /// Only this item's events.
        item: Option<String>,
        /// Only events after this sequence number.
        #[arg(long, value_name = "SEQ", default_value_t = 0)]
        after: u64,
        /// At most this many events (without `--follow`).
        #[arg(long, value_name = "N", conflicts_with = "follow")]
        limit: Option<usize>,
        /// Keep printing new events as they are committed, until Ctrl-C.
        #[arg(long)]
        follow: bool,
        /// Stop following after this many milliseconds (for tests and scripts).
        #[arg(long, value_name = "MS", requires = "follow", hide = true)]
        follow_for_ms: Option<u64>,
    },

    /// Remove items that finished for good before a cutoff (completed,
    /// cancelled, or failed with nothing left that can run without an
    /// operator), with their stages, attempts, decisions and events, in
    /// small batches beside running workers. Items in flight are untouched.
    Prune {
        /// How long ago: a whole number and a unit, `s`, `m`, `h`, `d` or
        /// `w` (e.g. `30d`, `12h`; `0s` means before now).
        #[arg(long, value_name = "DURATION", value_parser = parse_age)]
        finished_before: Duration,
    },

    /// The pipeline graph, as recorded in the database.
    Graph {
        /// The output format.
        #[arg(long, value_enum, default_value_t = GraphFormat::Dot)]
        format: GraphFormat,
        /// Label each stage with its item counts per state.
        #[arg(long)]
        counts: bool,
    },
}

impl Command {
    /// Whether the command only reads (opened read-only, taking no lock).
    pub fn only_reads(&self) -> bool {
        match self {
            Command::Status { .. }
            | Command::Items { .. }
            | Command::Review(ReviewCommand::List)
            | Command::Events { .. }
            | Command::Graph { .. } => true,
            Command::Approve { .. }
            | Command::Reject { .. }
            | Command::Retry { .. }
            | Command::Rerun { .. }
            | Command::Migrate { .. }
            | Command::Cancel { .. }
            | Command::Prune { .. } => false,
        }
    }
}

/// Parses an age such as `30d`: a whole number, then one unit (`s`, `m`,
/// `h`, `d`, `w`), nothing else.
pub fn parse_age(text: &str) -> Result<Duration, String> {
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = text.split_at(digits);
    if number.is_empty() {
        return Err(format!(
            "`{text}` does not start with a whole number (e.g. 30d, 12h)"
        ));
    }
    let seconds: u64 = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "w" => 604_800,
        "" => return Err(format!("`{text}` has no unit: add s, m, h, d or w")),
        other => {
            return Err(format!(
                "`{text}`: unknown unit `{other}` (use s, m, h, d or w)"
            ));
        }
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(seconds))
        .map(Duration::from_secs)
        .ok_or_else(|| format!("`{text}` is too long a time"))
}

/// `treadle review ...`.
#[derive(Debug, Subcommand)]
pub enum ReviewCommand {
    /// Every stage awaiting review, oldest request first, with its summary,
    /// details and proposed output.
    List,
}

/// Who decides a review, and what they say.
#[derive(Debug, Args)]
pub struct DecisionArgs {
    /// The reviewer's name, recorded with the decision.
    #[arg(long, value_name = "NAME")]
    pub by: String,
    /// A note recorded with the decision.
    #[arg(long, value_name = "TEXT")]
    pub note: Option<String>,
    /// The review round this decision answers (from `review list`); a
    /// decision for an older round is refused instead of overwriting a newer one.
    #[arg(long, value_name = "N")]
    pub round: Option<u64>,
}

/// The graph formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GraphFormat {
    /// Graphviz DOT.
    Dot,
    /// A Mermaid flowchart.
    Mermaid,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn approve_takes_the_reviewer_note_round_and_edits() {
        let cli = Cli::try_parse_from([
            "treadle", "--db", "x.db", "approve", "doc-1", "review", "--by", "alice", "--note",
            "ok", "--round", "2", "--edits", "e.json",
        ])
        .unwrap();
        match cli.command {
            Command::Approve {
                item,
                stage,
                decision,
                edits,
            } => {
                assert_eq!((item.as_str(), stage.as_str()), ("doc-1", "review"));
                assert_eq!(decision.by, "alice");
                assert_eq!(decision.note.as_deref(), Some("ok"));
                assert_eq!(decision.round, Some(2));
                assert_eq!(edits, Some(PathBuf::from("e.json")));
            }
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn reject_requires_a_reason_and_a_reviewer() {
        let missing_reason =
            Cli::try_parse_from(["treadle", "reject", "doc-1", "review", "--by", "bob"]);
        assert!(missing_reason.is_err());
        let missing_by =
            Cli::try_parse_from(["treadle", "reject", "doc-1", "review", "--reason", "no"]);
        assert!(missing_by.is_err());
    }

    #[test]
    fn an_age_is_a_whole_number_and_one_unit() {
        assert_eq!(parse_age("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_age("12h"), Ok(Duration::from_secs(12 * 3_600)));
        assert_eq!(parse_age("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_age("2w"), Ok(Duration::from_secs(14 * 86_400)));
        for bad in [
            "",
            "d",
            "30",
            "30x",
            "30 d",
            "-1d",
            "1.5h",
            "30dd",
            "99999999999999999999w",
        ] {
            assert!(parse_age(bad).is_err(), "`{bad}` was accepted");
        }
        assert_eq!(
            parse_age("30x"),
            Err("`30x`: unknown unit `x` (use s, m, h, d or w)".to_owned())
        );
    }

    #[test]
    fn prune_takes_its_cutoff_as_an_age() {
        let cli = Cli::try_parse_from(["treadle", "prune", "--finished-before", "30d"]).unwrap();
        match cli.command {
            Command::Prune { finished_before } => {
                assert_eq!(finished_before, Duration::from_secs(30 * 86_400));
            }
            other => panic!("parsed as {other:?}"),
        }
        let error = Cli::try_parse_from(["treadle", "prune", "--finished-before", "soon"])
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("--finished-before") && error.contains("`soon` does not start"),
            "{error}"
        );
    }

    #[test]
    fn json_is_accepted_after_the_command() {
        let cli = Cli::try_parse_from(["treadle", "status", "--json", "--db", "x.db"]).unwrap();
        assert!(cli.json);
        assert_eq!(cli.db, Some(PathBuf::from("x.db")));
    }
}
