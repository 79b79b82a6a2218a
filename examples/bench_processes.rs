//! The bench in several processes: it runs itself again (`--role`) as
//! worker processes (`--workers N`) or as the process that approves the
//! reviews (`--approver process`), each on its own handle on the parent's
//! store (`--at`: the SQLite file or the PostgreSQL schema).
//!
//! A child talks to the parent in lines on stdout: a worker says `ready`
//! once its store is open, starts on `go` (a line on its stdin), says
//! `finished N` as items finish and, once its stdin is closed and its run
//! has returned, `report ATTEMPTS DISCARDED ENDED_US`; the approver says
//! `approved ID AT_US` for each approval, then `took SECS`.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use treadle::RunReport;
use treadle::store::Store;

use super::{
    Args, BenchResult, OnStore, PROBE, Place, Role, approve_all, engine, item_ids, now_micros,
    reset_probe,
};

/// How often a worker tells the parent how many items it finished.
const PROGRESS_EVERY: Duration = Duration::from_millis(5);

/// What the worker processes did together.
pub(super) struct WorkersRun {
    /// Their attempts, summed.
    pub(super) report: RunReport,
    /// From telling them to start until the last run returned.
    pub(super) secs: f64,
}

/// The command that runs this bench again as `role` on the store at `place`.
fn command(args: &Args, place: &Place, role: &str) -> BenchResult<Command> {
    let exe = std::env::current_exe()?;
    let mut command = Command::new(exe);
    let workload = ["linear", "fanout", "review"][args.workload as usize];
    command
        .args(["--role", role, "--workload", workload])
        .args(["--store", &args.store])
        .args(["--items", &args.items.to_string()])
        .args(["--subtasks", &args.subtasks.to_string()])
        .args([
            "--runtime",
            if args.multi_thread() {
                "multi"
            } else {
                "current"
            },
        ])
        .args([
            "--at",
            &place.at().ok_or("a memory store cannot be shared")?,
        ]);
    if let Place::Postgres { url, .. } = place {
        command.args(["--pg-url", url]);
    }
    if let Some(rate) = args.approve_rate {
        command.args(["--approve-rate", &rate.to_string()]);
    }
    if let Some(concurrency) = args.concurrency {
        command.args(["--concurrency", &concurrency.to_string()]);
    }
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    Ok(command)
}

/// A line from child `index`'s stdout; `None` when it closed.
type Line = (usize, Option<String>);

/// Passes the lines child `index` writes to `lines`, from a thread of its own.
fn forward(index: usize, stdout: std::process::ChildStdout, lines: mpsc::UnboundedSender<Line>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send((index, Some(line))).is_err() {
                return;
            }
        }
        let _ = lines.send((index, None));
    });
}

/// The numbers after the first word of `line`.
fn numbers(line: &str) -> BenchResult<Vec<u64>> {
    line.split(' ')
        .skip(1)
        .map(|n| Ok(n.parse::<u64>().map_err(|e| format!("`{line}`: {e}"))?))
        .collect()
}

/// Waits for child process `child` to exit; an error unless it succeeded.
async fn exited(mut child: std::process::Child, what: String) -> BenchResult<()> {
    let status = tokio::task::spawn_blocking(move || child.wait()).await??;
    if !status.success() {
        return Err(format!("{what} failed: {status}").into());
    }
    Ok(())
}

/// Runs the submitted items through `workers` worker processes and
/// stops them once every item is through.
pub(super) async fn run_workers(
    args: &Args,
    place: &Place,
    workers: usize,
) -> BenchResult<WorkersRun> {
    let (sender, mut lines) = mpsc::unbounded_channel();
    let (mut children, mut stdins) = (Vec::new(), Vec::new());
    for index in 0..workers {
        let mut child = command(args, place, &format!("worker:{index}"))?.spawn()?;
        stdins.push(child.stdin.take().ok_or("no stdin")?);
        forward(
            index,
            child.stdout.take().ok_or("no stdout")?,
            sender.clone(),
        );
        children.push(child);
    }
    drop(sender);
    let mut ready = 0;
    while ready < workers {
        match lines.recv().await {
            Some((_, Some(line))) if line == "ready" => ready += 1,
            Some((index, None)) => return Err(format!("worker {index} ended early").into()),
            None => return Err("the workers ended early".into()),
            Some(_) => {}
        }
    }
    let go = now_micros();
    for stdin in &mut stdins {
        writeln!(stdin, "go")?;
        stdin.flush()?;
    }
    let mut finished = vec![0; workers];
    let mut reports = vec![None; workers];
    while let Some((index, line)) = lines.recv().await {
        let Some(line) = line else {
            if reports[index].is_none() {
                stdins.clear(); // the others stop
                return Err(format!("worker {index} stopped without a report").into());
            }
            continue;
        };
        let numbers = numbers(&line)?;
        match (line.split(' ').next(), &numbers[..]) {
            (Some("finished"), &[n]) => {
                finished[index] = n;
                if finished.iter().sum::<u64>() >= args.items {
                    stdins.clear(); // closing stdin stops a worker
                }
            }
            (Some("report"), &[attempts, discarded, ended]) => {
                reports[index] = Some((attempts, discarded, ended));
            }
            _ => return Err(format!("worker {index} said `{line}`").into()),
        }
    }
    for (index, child) in children.into_iter().enumerate() {
        exited(child, format!("worker {index}")).await?;
    }
    let mut report = RunReport::default();
    let mut ended = go;
    for (attempts, discarded, at) in reports.into_iter().flatten() {
        report.attempts += attempts;
        report.discarded += discarded;
        ended = ended.max(at);
    }
    Ok(WorkersRun {
        report,
        secs: (ended - go) as f64 / 1e6,
    })
}

/// Has another process approve every item's review; returns when each
/// `approve` returned there (µs since the UNIX epoch) and how long it took.
pub(super) async fn approve_elsewhere(
    args: &Args,
    place: &Place,
) -> BenchResult<(Vec<(String, u64)>, f64)> {
    let mut child = command(args, place, "approver")?.spawn()?;
    let (sender, mut lines) = mpsc::unbounded_channel();
    forward(0, child.stdout.take().ok_or("no stdout")?, sender);
    let mut approved = Vec::with_capacity(args.items as usize);
    let mut took = None;
    while let Some((_, Some(line))) = lines.recv().await {
        let mut words = line.split(' ');
        match (words.next(), words.next(), words.next()) {
            (Some("approved"), Some(id), Some(at)) => {
                let at = at.parse().map_err(|e| format!("`{line}`: {e}"))?;
                approved.push((id.to_owned(), at));
            }
            (Some("took"), Some(secs), None) => {
                took = Some(secs.parse().map_err(|e| format!("`{line}`: {e}"))?);
            }
            _ => return Err(format!("the approver said `{line}`").into()),
        }
    }
    exited(child, "the approver".into()).await?;
    Ok((
        approved,
        took.ok_or("the approver did not say how long it took")?,
    ))
}

/// Runs this process as the child `args.role` names.
pub(super) async fn child(args: &Args) -> BenchResult<()> {
    let place = Place::given(args)?;
    let name = match args.role {
        Role::Worker(index) => format!("bench-worker-{index}"),
        _ => "bench-approver".to_owned(),
    };
    place.open(&name, false, Child { args, name: &name }).await
}

/// What a child does on its store.
struct Child<'a> {
    args: &'a Args,
    name: &'a str,
}

impl OnStore for Child<'_> {
    type Output = ();

    async fn run<S: Store>(self, store: S) -> BenchResult<()> {
        match self.args.role {
            Role::Worker(_) => work(self.args, store, self.name).await,
            Role::Approver => approve(self.args, store).await,
            Role::Main => Err("the bench itself is no child".into()),
        }
    }
}

/// Prints `line` on stdout at once, for the parent.
fn say(line: &str) -> BenchResult<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")?;
    stdout.flush()?;
    Ok(())
}

/// A worker process: runs the work once told to, until its stdin closes.
async fn work<S: Store>(args: &Args, store: S, name: &str) -> BenchResult<()> {
    reset_probe(args, 0);
    let engine = engine(args, store, name);
    engine.drift().await?;
    let (go, go_said) = oneshot::channel();
    let (stop, stopped) = oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut line = String::new();
        if stdin.read_line(&mut line).is_ok_and(|n| n > 0) {
            let _ = go.send(());
            // Whatever follows is ignored: the end of stdin is the signal.
            let _ = std::io::copy(&mut stdin, &mut std::io::sink());
        }
        drop(stop);
    });
    say("ready")?;
    if go_said.await.is_err() {
        return Ok(()); // the parent went away before the start
    }
    let progress = tokio::spawn(async {
        let mut told = 0;
        loop {
            tokio::time::sleep(PROGRESS_EVERY).await;
            let finished = PROBE.finished.load(Ordering::Relaxed);
            if finished != told && say(&format!("finished {finished}")).is_err() {
                return;
            }
            told = finished;
        }
    });
    let report = engine
        .run(async {
            let _ = stopped.await;
        })
        .await?;
    let ended = now_micros();
    progress.abort();
    say(&format!(
        "report {} {} {ended}",
        report.attempts, report.discarded
    ))
}

/// The approver process: approves every item's review, then reports when
/// each approval returned.
async fn approve<S: Store>(args: &Args, store: S) -> BenchResult<()> {
    let engine = engine(args, store, "bench-approver");
    let (approved, secs) = approve_all(&engine, &item_ids(args.items), args.approve_rate).await?;
    for (id, at) in approved {
        say(&format!("approved {id} {at}"))?;
    }
    say(&format!("took {secs}"))
}
